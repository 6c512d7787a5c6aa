//! A test certificate authority made with `openssl`: a CA certificate, and server certificates it
//! signs for `127.0.0.1`, `::1` and `localhost`, to serve TLS on loopback in tests.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

use super::process::require;

const INSTALL_OPENSSL: &str = "apt-get install -y openssl";

/// A CA's key and certificate in a directory of the caller's.
#[derive(Debug)]
pub struct TestCa {
    dir: PathBuf,
    name: String,
}

fn openssl(args: &[&str], dir: &Path) {
    let bin = require("openssl", INSTALL_OPENSSL);
    let out = Command::new(bin)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("openssl (install it with: {INSTALL_OPENSSL}): {e}"));
    assert!(out.status.success(), "openssl {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
}

/// Serial numbers distinct within this process (and, by the time, across runs).
fn serial() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    format!("0x{:x}{:04x}", nanos, N.fetch_add(1, Ordering::Relaxed) & 0xffff)
}

impl TestCa {
    /// Makes `DIR/NAME-ca.key` and `DIR/NAME-ca.crt` (P-256, valid two days).
    pub fn new(dir: &Path, name: &str) -> TestCa {
        std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        let (key, crt) = (format!("{name}-ca.key"), format!("{name}-ca.crt"));
        let subj = format!("/CN={name} test CA");
        openssl(
            &[
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                &key,
                "-out",
                &crt,
                "-days",
                "2",
                "-subj",
                &subj,
            ],
            dir,
        );
        TestCa { dir: dir.to_path_buf(), name: name.to_string() }
    }

    /// The CA certificate (PEM), what clients trust.
    pub fn cert(&self) -> PathBuf {
        self.dir.join(format!("{}-ca.crt", self.name))
    }

    /// Signs a new server certificate for 127.0.0.1, ::1 and localhost, and returns the paths of
    /// the certificate and its key, `DIR/STEM.crt` and `DIR/STEM.key` (PEM, PKCS#8).
    pub fn server(&self, dir: &Path, stem: &str) -> (PathBuf, PathBuf) {
        std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        let (crt, key, csr, ext) =
            (format!("{stem}.crt"), format!("{stem}.key"), format!("{stem}.csr"), format!("{stem}.ext"));
        let subj = format!("/CN={stem}");
        openssl(
            &[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                &key,
                "-out",
                &csr,
                "-subj",
                &subj,
            ],
            dir,
        );
        let ext_path = dir.join(&ext);
        std::fs::write(
            &ext_path,
            "subjectAltName=IP:127.0.0.1,IP:::1,DNS:localhost\nbasicConstraints=critical,CA:FALSE\n\
             keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n",
        )
        .unwrap_or_else(|e| panic!("write {}: {e}", ext_path.display()));
        let (ca_crt, ca_key) = (self.cert(), self.dir.join(format!("{}-ca.key", self.name)));
        let serial = serial();
        openssl(
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                &ca_crt.to_string_lossy(),
                "-CAkey",
                &ca_key.to_string_lossy(),
                "-set_serial",
                &serial,
                "-days",
                "2",
                "-extfile",
                &ext,
                "-out",
                &crt,
            ],
            dir,
        );
        (dir.join(crt), dir.join(key))
    }
}
