//! The Go tools the end-to-end tests run (the control plane harness and helm):
//! where they live, and building them on first use with `tests/build-tools.sh`,
//! the same script CI runs before `cargo test`.

use std::env;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Instant;

use anyhow::{Context, bail};

/// Overrides the control plane binary; nothing is built when it is set.
pub const CONTROLPLANE_BIN_ENV: &str = "TOLLGATE_CONTROLPLANE_BIN";
/// Overrides the helm binary; nothing is built when it is set.
pub const HELM_BIN_ENV: &str = "TOLLGATE_HELM_BIN";
/// Overrides the directory the tools are built into (default `<target>/e2e-tools`).
pub const TOOLS_DIR_ENV: &str = "TOLLGATE_E2E_TOOLS_DIR";

/// The workspace root (the repository), found at compile time.
pub fn workspace_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent directory")
}

/// Cargo's target directory: `$CARGO_TARGET_DIR` (relative to the workspace root
/// when relative, as `build-tools.sh` reads it), else the nearest ancestor of the
/// running test executable that holds cargo's `CACHEDIR.TAG`.
pub fn target_dir() -> PathBuf {
    if let Some(dir) = env::var_os("CARGO_TARGET_DIR") {
        return workspace_root().join(dir);
    }
    let exe = env::current_exe().unwrap_or_default();
    exe.ancestors()
        .find(|dir| dir.join("CACHEDIR.TAG").is_file())
        // <target>/<profile>/deps/<test binary>
        .or_else(|| exe.ancestors().nth(3))
        .map(Path::to_path_buf)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// Where the tools are built: `$TOLLGATE_E2E_TOOLS_DIR`, else `<target>/e2e-tools`.
pub fn tools_dir() -> PathBuf {
    match env::var_os(TOOLS_DIR_ENV) {
        Some(dir) => workspace_root().join(dir),
        None => target_dir().join("e2e-tools"),
    }
}

/// The control plane binary (`tests/controlplane`), built on first use unless
/// `$TOLLGATE_CONTROLPLANE_BIN` names one. Panics with the build error.
pub fn controlplane_bin() -> &'static Path {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    resolve(&BIN, CONTROLPLANE_BIN_ENV, "controlplane")
}

/// The helm v3 binary, built from its Go module on first use unless
/// `$TOLLGATE_HELM_BIN` names one. Panics with the build error.
pub fn helm_bin() -> &'static Path {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    resolve(&BIN, HELM_BIN_ENV, "helm")
}

/// The node components (`tests/node`: kubelet, controller-manager, scheduler, kube-proxy and
/// a cluster DNS in one binary), built on first use. Panics with the build error.
pub fn node_bin() -> &'static Path {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    resolve(&BIN, "TOLLGATE_NODE_BIN", "node")
}

// A failed build is remembered, so every test that needs the tool fails at once
// with the same message instead of building again.
fn resolve(
    cell: &'static OnceLock<Result<PathBuf, String>>,
    env_var: &str,
    tool: &str,
) -> &'static Path {
    let bin = cell.get_or_init(|| match env::var_os(env_var) {
        Some(path) => Ok(PathBuf::from(path)),
        None => build_tool(tool).map_err(|e| format!("{e:#}")),
    });
    match bin {
        Ok(path) => path,
        Err(e) => panic!("e2e tool {tool} is not available: {e}"),
    }
}

/// Runs `tests/build-tools.sh TOOL` (a no-op when the tool is up to date) and
/// returns the binary's path. The script's progress goes straight to stderr.
pub fn build_tool(tool: &str) -> anyhow::Result<PathBuf> {
    let dir = tools_dir();
    let script = workspace_root().join("tests/build-tools.sh");
    progress(&format!("{tool}: running {} {tool}", script.display()));
    let start = Instant::now();
    let status = Command::new("bash")
        .arg(&script)
        .arg(tool)
        .env(TOOLS_DIR_ENV, &dir)
        .status()
        .with_context(|| format!("running {}", script.display()))?;
    if !status.success() {
        bail!(
            "{} {tool} failed ({status}); its output is above",
            script.display()
        );
    }
    let bin = dir.join(tool);
    if !bin.is_file() {
        bail!(
            "{} {tool} succeeded but {} is missing",
            script.display(),
            bin.display()
        );
    }
    progress(&format!(
        "{tool}: {} ({:.1?})",
        bin.display(),
        start.elapsed()
    ));
    Ok(bin)
}

/// Writes a progress line to the real stderr: libtest captures `eprintln!`, but
/// a cold build that takes minutes should be visible while it happens.
pub(crate) fn progress(msg: &str) {
    let _ = writeln!(std::io::stderr(), "e2e: {msg}");
}
