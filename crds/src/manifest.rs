//! Reading PartnerIntegration manifests from a YAML stream (what one would `kubectl apply`).

use serde::Deserialize;

use crate::v1alpha1::PartnerIntegration;

/// Why a manifest stream could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("document {index}: not valid YAML for a PartnerIntegration: {source}")]
    Parse {
        /// 1-based position of the document in the stream.
        index: usize,
        #[source]
        source: serde_yaml::Error,
    },
    #[error(
        "document {index}: kind {kind:?} apiVersion {api_version:?} is not tollgate.dev/v1alpha1 PartnerIntegration"
    )]
    WrongKind {
        index: usize,
        kind: String,
        api_version: String,
    },
    #[error("document {index}: metadata.name must be set")]
    MissingName { index: usize },
    #[error(
        "document {index} ({namespace}/{name}) repeats an earlier document's namespace and name"
    )]
    Duplicate {
        index: usize,
        namespace: String,
        name: String,
    },
}

/// Parses a YAML stream of PartnerIntegrations. Empty documents are skipped; a document without
/// a namespace gets `default_namespace`, as `kubectl apply` would.
pub fn parse_stream(
    text: &str,
    default_namespace: &str,
) -> Result<Vec<PartnerIntegration>, ManifestError> {
    let mut out: Vec<PartnerIntegration> = Vec::new();
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let index = i + 1;
        let value = serde_yaml::Value::deserialize(doc)
            .map_err(|source| ManifestError::Parse { index, source })?;
        if value.is_null() {
            continue;
        }
        let kind = value
            .get("kind")
            .and_then(|k| k.as_str())
            .unwrap_or_default()
            .to_string();
        let api_version = value
            .get("apiVersion")
            .and_then(|k| k.as_str())
            .unwrap_or_default()
            .to_string();
        if kind != "PartnerIntegration" || api_version != "tollgate.dev/v1alpha1" {
            return Err(ManifestError::WrongKind {
                index,
                kind,
                api_version,
            });
        }
        let mut pi: PartnerIntegration = serde_yaml::from_value(value)
            .map_err(|source| ManifestError::Parse { index, source })?;
        let name = pi.metadata.name.clone().unwrap_or_default();
        if name.is_empty() {
            return Err(ManifestError::MissingName { index });
        }
        let namespace = pi
            .metadata
            .namespace
            .get_or_insert_with(|| default_namespace.to_string())
            .clone();
        if out.iter().any(|o| {
            o.metadata.name.as_deref() == Some(&name)
                && o.metadata.namespace.as_deref() == Some(&namespace)
        }) {
            return Err(ManifestError::Duplicate {
                index,
                namespace,
                name,
            });
        }
        out.push(pi);
    }
    Ok(out)
}
