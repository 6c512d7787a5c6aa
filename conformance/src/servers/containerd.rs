//! A real containerd (1.6 from apt) with its own root, state and socket, the CRI plugin disabled,
//! driven with `ctr`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use tempfile::TempDir;

use super::process::{Proc, require, tempdir, tempdir_in};

const INSTALL_CONTAINERD: &str = "apt-get install -y containerd runc";

/// A private containerd daemon.
#[derive(Debug)]
pub struct Containerd {
    proc: Proc,
    dir: TempDir,
}

impl Containerd {
    /// Starts containerd; `extra_config` is appended to its TOML config (e.g. a proxy plugin).
    /// Its root, state and socket are in a new directory under the system's temp dir.
    pub fn start(extra_config: &str) -> Containerd {
        Self::start_with_dir(tempdir("containerd"), extra_config)
    }

    /// [`Containerd::start`] with root, state and socket in a new directory under `parent` (a
    /// benchmark keeps containerd's root on the same filesystem as the snapshotter's).
    pub fn start_under(parent: &Path, extra_config: &str) -> Containerd {
        Self::start_with_dir(tempdir_in("containerd", parent), extra_config)
    }

    fn start_with_dir(dir: TempDir, extra_config: &str) -> Containerd {
        let bin = require("containerd", INSTALL_CONTAINERD);
        require("ctr", INSTALL_CONTAINERD);
        let d = dir.path();
        let config = format!(
            "version = 2\nroot = \"{root}\"\nstate = \"{state}\"\n\
             disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
             [grpc]\n  address = \"{sock}\"\n[ttrpc]\n  address = \"{sock}.ttrpc\"\n\
             [debug]\n  address = \"{d}/debug.sock\"\n{extra_config}\n",
            root = d.join("root").display(),
            state = d.join("state").display(),
            sock = d.join("containerd.sock").display(),
            d = d.display(),
        );
        let config_path = d.join("config.toml");
        std::fs::write(&config_path, config)
            .unwrap_or_else(|e| panic!("write {}: {e}", config_path.display()));
        let mut cmd = Command::new(bin);
        cmd.arg("--config").arg(&config_path);
        let mut proc = Proc::spawn("containerd", cmd, d.join("containerd.log"));
        let sock = d.join("containerd.sock");
        proc.wait_ready("answering `ctr version`", Duration::from_secs(20), || {
            sock.exists()
                && Command::new("ctr")
                    .arg("--address")
                    .arg(&sock)
                    .arg("version")
                    .output()
                    .is_ok_and(|o| o.status.success())
        });
        Containerd { proc, dir }
    }

    /// The gRPC socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("containerd.sock")
    }

    /// Runs `ctr --address SOCK ARGS...` and returns its output.
    pub fn ctr(&self, args: &[&str]) -> Output {
        Command::new("ctr")
            .arg("--address")
            .arg(self.socket())
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("run ctr: {e}"))
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.proc.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.proc.child.id()
    }
}
