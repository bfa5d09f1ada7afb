//! The chart as a real `helm` binary renders it. helm comes from
//! `bash .ci/tools.sh` (into `.tools/bin`) or `IDEMQ_HELM`.

use std::path::PathBuf;
use std::process::Command;

/// The repository's root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The helm binary: `IDEMQ_HELM`, or the one `bash .ci/tools.sh` installs.
fn helm() -> anyhow::Result<PathBuf> {
    let path = std::env::var_os("IDEMQ_HELM")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join(".tools/bin/helm"));
    anyhow::ensure!(
        path.exists(),
        "helm not found at {}: run `bash .ci/tools.sh` once (or set IDEMQ_HELM)",
        path.display()
    );
    Ok(path)
}

/// `helm template idemq charts/idemq --namespace <namespace> <args>`: the
/// rendered YAML, or helm's complaint as the error.
pub fn template(namespace: &str, args: &[&str]) -> anyhow::Result<String> {
    let output = Command::new(helm()?)
        .args([
            "template",
            "idemq",
            "charts/idemq",
            "--namespace",
            namespace,
        ])
        .args(args)
        .current_dir(root())
        .output()?;
    anyhow::ensure!(
        output.status.success(),
        "helm template failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8(output.stdout)?)
}
