//! Standalone mode: a YAML stream of PartnerIntegration manifests, watched and reloaded.
//!
//! A file that cannot be read or parsed is logged, counted in `tollgate_config_errors_total`,
//! and the previous revision stays in force. Past that, each integration stands alone: one
//! whose spec does not compile, or that claims a host another holds, is refused (logged with
//! the field path, counted, shown in `/config` and `tollgate_config_refused`), its previous
//! version stays in force if it had one, and the others apply. At start-up there is nothing to
//! fall back on, so the first load must be valid as a whole.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tollgate_crds::manifest;
use tollgate_crds::v1alpha1::SecretKeyRef;

use super::secrets::SecretsDir;
use super::{Candidate, Source, Store, build_revision, fingerprint};
use crate::state::{QuotaShares, StateContext};
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
    #[error("{path}: {integration}: {error}")]
    Refused {
        path: String,
        integration: String,
        error: String,
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
    /// Reads, compiles and publishes the file once; any error (an integration refused
    /// included) publishes nothing. For start-up, when there is no previous revision to keep.
    pub fn reload(&self) -> Result<String, ConfigError> {
        let content = self.read()?;
        self.apply(&content, true).map(|(id, _)| id)
    }

    fn read(&self) -> Result<Vec<u8>, ConfigError> {
        std::fs::read(&self.path).map_err(|source| ConfigError::Read {
            path: self.path.display().to_string(),
            source,
        })
    }

    /// Publishes what the file holds. `strict`: refuse the whole file when any integration is
    /// refused; otherwise publish the others and report those.
    fn apply(
        &self,
        content: &[u8],
        strict: bool,
    ) -> Result<(String, Vec<SecretKeyRef>), ConfigError> {
        let path = self.path.display().to_string();
        let text = String::from_utf8_lossy(content);
        let items = manifest::parse_stream(&text, DEFAULT_NAMESPACE).map_err(|source| {
            ConfigError::Manifest {
                path: path.clone(),
                source,
            }
        })?;
        let mut candidates = Vec::with_capacity(items.len());
        let mut refs = Vec::new();
        for pi in &items {
            let ns = pi
                .metadata
                .namespace
                .as_deref()
                .unwrap_or(DEFAULT_NAMESPACE);
            let name = pi.metadata.name.as_deref().unwrap_or_default();
            refs.extend(super::secret_refs(&pi.spec));
            match tollgate_crds::compile_enforceable(ns, name, &pi.spec) {
                Ok(policy) => candidates.push(Candidate::Compiled(Box::new(policy))),
                Err(source) if strict => {
                    return Err(ConfigError::Invalid {
                        path,
                        integration: format!("{ns}/{name}"),
                        source,
                    });
                }
                Err(e) => candidates.push(Candidate::Invalid {
                    id: tollgate_crds::policy::IntegrationId {
                        namespace: ns.to_string(),
                        name: name.to_string(),
                    },
                    error: e.to_string(),
                }),
            }
        }
        let id = fingerprint(content);
        let previous = self.store.load_full();
        let revision = build_revision(
            id.clone(),
            Source::File(path.clone()),
            candidates,
            &self.secrets,
            &previous,
            &self.ctx,
            &QuotaShares::new(),
        );
        if strict && let Some(r) = revision.refused.first() {
            return Err(ConfigError::Refused {
                path,
                integration: r.integration.to_string(),
                error: r.error.clone(),
            });
        }
        if !revision.refused.is_empty() {
            self.metrics.config_error();
        }
        self.metrics
            .set_refused(revision.refused.iter().map(|r| r.integration.to_string()));
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
                .flat_map(|pi| super::secret_refs(&pi.spec))
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
                    match self.apply(&now.content, false) {
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
