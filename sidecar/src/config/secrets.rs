//! Credentials from files: `--secrets-dir DIR/<secret name>/<key>`, as a Secret volume lays them
//! out.

use std::path::{Path, PathBuf};

use tollgate_crds::v1alpha1::SecretKeyRef;

use super::SecretSource;

/// Reads `DIR/<name>/<key>` (the namespace is not part of the path: a pod mounts its own
/// namespace's Secrets).
#[derive(Debug, Clone)]
pub struct SecretsDir {
    root: Option<PathBuf>,
}

impl SecretsDir {
    pub fn new(root: Option<PathBuf>) -> Self {
        SecretsDir { root }
    }

    fn path(&self, secret: &SecretKeyRef) -> Option<PathBuf> {
        let root = self.root.as_ref()?;
        // A name or key with a path separator or `..` could read outside DIR.
        let safe = |s: &str| !s.is_empty() && !s.contains(['/', '\\']) && s != "." && s != "..";
        if !safe(&secret.name) || !safe(&secret.key) {
            return None;
        }
        Some(root.join(&secret.name).join(&secret.key))
    }

    /// A fingerprint of every referenced secret file's content, to notice rotations.
    pub fn snapshot(&self, refs: &[SecretKeyRef]) -> Vec<Option<Vec<u8>>> {
        refs.iter()
            .map(|r| self.path(r).and_then(|p| std::fs::read(p).ok()))
            .collect()
    }

    pub fn root(&self) -> Option<&Path> {
        self.root.as_deref()
    }
}

impl SecretSource for SecretsDir {
    fn get(&self, _namespace: &str, secret: &SecretKeyRef) -> Option<String> {
        let path = self.path(secret)?;
        std::fs::read_to_string(path).ok()
    }
}
