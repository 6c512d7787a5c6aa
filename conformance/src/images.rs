//! Real test images: a Debian base (debootstrap) and an application layer installed with apt, built
//! by `scripts/debian-image.sh` into an OCI image layout and cached between runs.

use std::path::PathBuf;
use std::process::Command;

/// The OCI layout with tags `base`, `app` (redis-server) and `app-v2` (plus Debian security and
/// point-release updates). Built on first use: minutes, and it needs root and the Debian mirror.
/// `STARLIGHT_IMAGES` overrides the cache directory (default `/var/tmp/starlight-images`).
pub fn debian_layout() -> PathBuf {
    let out = std::env::var("STARLIGHT_IMAGES").unwrap_or_else(|_| "/var/tmp/starlight-images".into());
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/debian-image.sh");
    let st = Command::new("bash").arg(script).arg(&out).status().unwrap_or_else(|e| panic!("run bash: {e}"));
    assert!(
        st.success(),
        "{script} failed: it needs root, debootstrap, umoci and skopeo \
         (apt-get install -y debootstrap umoci skopeo)"
    );
    PathBuf::from(out).join("oci")
}

/// Copies `tag` of `layout` to `dest` (`docker://...` or `oci:...`) with skopeo, over plain HTTP.
pub fn skopeo_copy(src: &str, dest: &str, creds: Option<&str>) {
    let mut cmd = Command::new("skopeo");
    cmd.args(["copy", "--quiet", "--src-tls-verify=false", "--dest-tls-verify=false"]);
    if let Some(c) = creds {
        cmd.args(["--src-creds", c, "--dest-creds", c]);
    }
    let out =
        cmd.arg(src).arg(dest).output().unwrap_or_else(|e| panic!("skopeo (apt-get install -y skopeo): {e}"));
    assert!(out.status.success(), "skopeo copy {src} {dest}: {}", String::from_utf8_lossy(&out.stderr));
}
