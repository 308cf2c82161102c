//! The Tollgate binaries under test, `tollgate-operator` and `tollgate-sidecar`: built once per
//! test process with `cargo build` (a no-op when they are fresh), in the profile and target
//! directory of the running test, unless an environment variable names a binary to use.

use std::env;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Instant;

use anyhow::{Context, bail};

use crate::tools::{progress, target_dir, workspace_root};

/// Use this operator binary; nothing is built for it.
pub const OPERATOR_BIN_ENV: &str = "TOLLGATE_OPERATOR_BIN";
/// Use this sidecar binary; nothing is built for it.
pub const SIDECAR_BIN_ENV: &str = "TOLLGATE_SIDECAR_BIN";

/// The operator binary. Panics with the build error.
pub fn operator_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| resolve(OPERATOR_BIN_ENV, "tollgate-operator"))
}

/// The sidecar binary. Panics with the build error.
pub fn sidecar_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| resolve(SIDECAR_BIN_ENV, "tollgate-sidecar"))
}

fn resolve(env_var: &str, name: &str) -> PathBuf {
    if let Some(path) = env::var_os(env_var) {
        return PathBuf::from(path);
    }
    if let Err(e) = build_once() {
        panic!("cannot build the Tollgate binaries: {e}");
    }
    let bin = profile_dir().join(name);
    assert!(
        bin.is_file(),
        "{} is missing after cargo build",
        bin.display()
    );
    bin
}

/// The profile directory the running test (or example) was built into: `<target>/<profile>`.
fn profile_dir() -> PathBuf {
    let exe = env::current_exe().unwrap_or_default();
    // <target>/<profile>/deps/<test> or <target>/<profile>/examples/<example>
    match exe.parent() {
        Some(dir) if dir.ends_with("deps") || dir.ends_with("examples") => dir
            .parent()
            .map_or_else(|| target_dir().join("debug"), Path::to_path_buf),
        _ => target_dir().join("debug"),
    }
}

/// Runs `cargo build -p tollgate-operator -p tollgate-sidecar --bins` once, in the profile of
/// the running test; later calls return the first outcome.
fn build_once() -> Result<(), String> {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    BUILT
        .get_or_init(|| build().map_err(|e| format!("{e:#}")))
        .clone()
}

fn build() -> anyhow::Result<()> {
    let profile_dir = profile_dir();
    let profile = match profile_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") | None => "dev".to_string(),
        Some(other) => other.to_string(),
    };
    let target = profile_dir
        .parent()
        .map_or_else(target_dir, Path::to_path_buf);
    let cargo = env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"));
    let mut cmd = Command::new(&cargo);
    // What cargo sets for the running test's own package would leak into the build scripts'
    // tracked environment (ring's reads CARGO_MANIFEST_DIR) and rebuild half the tree.
    for (key, _) in env::vars_os() {
        let per_package = key.to_str().is_some_and(|k| {
            [
                "CARGO_PKG_",
                "CARGO_MANIFEST_",
                "CARGO_CRATE_",
                "CARGO_BIN_",
            ]
            .iter()
            .any(|p| k.starts_with(p))
                || [
                    "CARGO_PRIMARY_PACKAGE",
                    "CARGO_TARGET_TMPDIR",
                    "CARGO_RUSTC_CURRENT_DIR",
                    "OUT_DIR",
                ]
                .contains(&k)
        });
        if per_package {
            cmd.env_remove(&key);
        }
    }
    cmd.current_dir(workspace_root())
        .args([
            "build",
            "--bins",
            "-p",
            "tollgate-operator",
            "-p",
            "tollgate-sidecar",
        ])
        .args(["--profile", &profile])
        .arg("--target-dir")
        .arg(&target);
    progress(&format!(
        "building the operator and sidecar ({profile} profile) into {}",
        target.display()
    ));
    let start = Instant::now();
    // cargo's own progress goes straight to stderr: a cold build takes minutes.
    let status = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed ({status}); its output is above");
    }
    progress(&format!("binaries ready ({:.1?})", start.elapsed()));
    Ok(())
}
