//! Standalone mode: a YAML stream of PartnerIntegration manifests, watched and reloaded.
//!
//! A bad edit (unreadable file, YAML that does not parse, an invalid spec, two integrations
//! claiming one host) is logged with the field path, counted in `tollgate_config_errors_total`,
//! and the previous revision stays in force.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tollgate_crds::manifest;
use tollgate_crds::v1alpha1::SecretKeyRef;

use super::secrets::SecretsDir;
use super::{RevisionError, Source, Store, build_revision, fingerprint};
use crate::state::StateContext;
use crate::telemetry::metrics::Metrics;

/// Namespace given to manifests that name none, as `kubectl apply` would in the default context.
pub const DEFAULT_NAMESPACE: &str = "default";

/// Why a configuration file was not applied.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Manifest {
        path: String,
        #[source]
        source: manifest::ManifestError,
    },
    #[error("{path}: {integration}: {source}")]
    Invalid {
        path: String,
        integration: String,
        #[source]
        source: tollgate_crds::CompileError,
    },
    #[error("{path}: {source}")]
    Revision {
        path: String,
        #[source]
        source: RevisionError,
    },
}

pub struct FileSource {
    pub path: PathBuf,
    pub secrets: SecretsDir,
    pub store: Arc<Store>,
    pub ctx: StateContext,
    pub metrics: Arc<Metrics>,
}

/// What was last applied, to notice changes.
#[derive(Default, PartialEq)]
struct Seen {
    content: Vec<u8>,
    secrets: Vec<Option<Vec<u8>>>,
}

impl FileSource {
    /// Reads, compiles and publishes the file once; on error nothing is published.
    pub fn reload(&self) -> Result<String, ConfigError> {
        let content = self.read()?;
        self.apply(&content).map(|(id, _)| id)
    }

    fn read(&self) -> Result<Vec<u8>, ConfigError> {
        std::fs::read(&self.path).map_err(|source| ConfigError::Read {
            path: self.path.display().to_string(),
            source,
        })
    }

    fn apply(&self, content: &[u8]) -> Result<(String, Vec<SecretKeyRef>), ConfigError> {
        let path = self.path.display().to_string();
        let text = String::from_utf8_lossy(content);
        let items = manifest::parse_stream(&text, DEFAULT_NAMESPACE).map_err(|source| {
            ConfigError::Manifest {
                path: path.clone(),
                source,
            }
        })?;
        let mut policies = Vec::with_capacity(items.len());
        let mut refs = Vec::new();
        for pi in &items {
            let ns = pi
                .metadata
                .namespace
                .as_deref()
                .unwrap_or(DEFAULT_NAMESPACE);
            let name = pi.metadata.name.as_deref().unwrap_or_default();
            let policy = tollgate_crds::compile(ns, name, &pi.spec).map_err(|source| {
                ConfigError::Invalid {
                    path: path.clone(),
                    integration: format!("{ns}/{name}"),
                    source,
                }
            })?;
            if let Some(c) = &policy.credentials {
                refs.push(c.secret_ref.clone());
            }
            policies.push(policy);
        }
        let id = fingerprint(content);
        let previous = self.store.load_full();
        let revision = build_revision(
            id.clone(),
            Source::File(path.clone()),
            policies,
            &self.secrets,
            &previous,
            &self.ctx,
        )
        .map_err(|source| ConfigError::Revision { path, source })?;
        self.store.publish(revision);
        self.metrics.set_revision(&id, "file");
        Ok((id, refs))
    }

    /// Polls the file and the referenced secret files; applies every change. Never returns.
    pub async fn watch(self, interval: Duration) {
        let mut seen = Seen::default();
        let mut refs: Vec<SecretKeyRef> = Vec::new();
        // What `reload` already applied at start-up is not applied again.
        if let Ok(content) = self.read()
            && self.store.load().id == fingerprint(&content)
            && let Ok(items) =
                manifest::parse_stream(&String::from_utf8_lossy(&content), DEFAULT_NAMESPACE)
        {
            refs = items
                .iter()
                .filter_map(|pi| pi.spec.credentials.as_ref().map(|c| c.secret_ref.clone()))
                .collect();
            seen = Seen {
                secrets: self.secrets.snapshot(&refs),
                content,
            };
        }
        let mut failed_content: Option<Vec<u8>> = None;
        loop {
            let current = match self.read() {
                Ok(c) => Some(c),
                Err(e) => {
                    // A missing file during an atomic replace is normal for a moment; report it
                    // once per distinct failure.
                    if failed_content.as_deref() != Some(b"\0unreadable") {
                        tracing::error!(error = %e, "config not reloaded; previous revision stays in force");
                        self.metrics.config_error();
                        failed_content = Some(b"\0unreadable".to_vec());
                    }
                    None
                }
            };
            if let Some(content) = current {
                let secrets = self.secrets.snapshot(&refs);
                let now = Seen { content, secrets };
                let changed = now != seen;
                let already_failed =
                    failed_content.as_ref() == Some(&now.content) && now.secrets == seen.secrets;
                if changed && !already_failed {
                    match self.apply(&now.content) {
                        Ok((id, new_refs)) => {
                            tracing::info!(revision = %id, path = %self.path.display(), "config applied");
                            refs = new_refs;
                            failed_content = None;
                            seen = Seen {
                                secrets: self.secrets.snapshot(&refs),
                                content: now.content,
                            };
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "config rejected; previous revision stays in force");
                            self.metrics.config_error();
                            failed_content = Some(now.content);
                        }
                    }
                }
            }
            tokio::time::sleep(interval).await;
        }
    }
}
