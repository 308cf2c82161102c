//! Writes the PartnerIntegration CRD generated from the Rust types.
//!
//! `cargo run -p tollgate-crds --bin crdgen` rewrites `crds/partnerintegrations.tollgate.dev.yaml`
//! and the chart's copy (`charts/tollgate/crds/`); `--stdout` prints it instead.

use std::path::PathBuf;

fn main() -> std::io::Result<()> {
    let yaml = tollgate_crds::crd_yaml();
    if std::env::args().any(|a| a == "--stdout") {
        print!("{yaml}");
        return Ok(());
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    for relative in [tollgate_crds::CRD_PATH, tollgate_crds::CHART_CRD_PATH] {
        let path = root.join(relative);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(&path, &yaml)?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}
