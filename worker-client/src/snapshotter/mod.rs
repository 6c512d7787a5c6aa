//! The containerd snapshotter: overlay semantics for ordinary layers, and Starlight images served
//! by FUSE while their bundles stream.
//!
//! ```text
//! ROOT/metadata.redb               every snapshot: kind, parent, labels, times, image, mount pid
//! ROOT/snapshots/<id>/fs           an overlay upper directory, or a Starlight image's mount point
//! ROOT/snapshots/<id>/work         overlay's work directory (active snapshots)
//! ROOT/snapshots/<id>/mount.log    the output of the process that serves a Starlight image
//! ROOT/store/                      the Starlight store (contents, image records, resume state)
//! ```
//!
//! Ordinary snapshots behave as containerd's overlayfs snapshotter's: a snapshot without parent
//! is a bind mount of its directory, one with parents an overlay whose lower directories are the
//! parents' (nearest first), so `ctr pull --snapshotter starlight` of any image works.
//!
//! A Starlight image is one committed snapshot holding the whole flattened root filesystem. It is
//! made when a prepare carries the label [`IMAGE_LABEL`] (`starlight-pull --containerd` sends
//! it): a `starlight-pull mount` process is started on the snapshot's `fs` directory, and once the
//! image's metadata has arrived (the contents follow in start-up order), the prepare answers
//! "already exists" with a committed snapshot labelled with the requested target, the way remote
//! snapshotters answer. Containers get an overlay whose lower directory is that mount.
//!
//! The mount processes run in their own process groups and outlive the snapshotter: a restart
//! of the snapshotter leaves running containers untouched. At start, a Starlight snapshot whose
//! process is gone (a crash, a reboot) is mounted again, and its pull resumes where it stopped.

pub mod filter;
pub mod service;

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

pub use crate::containerd::pull::{IMAGE_LABEL, TARGET_LABEL};
use crate::store::{Reference, Store};

const SNAPSHOTS: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshots");
const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");

/// How the snapshotter reaches the gateway and runs mounts.
#[derive(Clone, Debug)]
pub struct Config {
    pub root: PathBuf,
    pub gateway: String,
    /// `USER:PASSWORD` for the registry behind the gateway; passed to mounts in the environment.
    pub credentials: Option<String>,
    /// CA certificates for an `https://` gateway; passed to mounts as `--ca-file`.
    pub ca_file: Option<PathBuf>,
    /// Passed to mounts as `--allow-plain-http-credentials`.
    pub allow_plain_http_credentials: bool,
    pub platform: Option<String>,
    /// The `starlight-pull` binary that serves mounts.
    pub pull_bin: PathBuf,
    /// Seconds a read of a content not arrived yet may wait before it fails.
    pub read_timeout: u64,
    /// Mounts send the start-up trace they recorded to the gateway when they stop (profiling).
    pub upload_traces: bool,
}

/// A refused or failed operation; the variant is the gRPC code containerd maps to its errors.
#[derive(Debug, thiserror::Error)]
pub enum SnapError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    Internal(String),
}

fn internal(what: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> SnapError {
    let what = what.to_string();
    move |e| SnapError::Internal(format!("{what}: {e}"))
}

fn db_err(e: impl std::fmt::Display) -> SnapError {
    SnapError::Internal(format!("snapshot metadata: {e}"))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    View,
    Active,
    Committed,
}

impl Kind {
    /// containerd's numbering (`snapshots.v1.Kind`).
    pub fn proto(self) -> i32 {
        match self {
            Kind::View => 1,
            Kind::Active => 2,
            Kind::Committed => 3,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::View => "view",
            Kind::Active => "active",
            Kind::Committed => "committed",
        }
    }
}

/// One snapshot, as kept in the metadata database.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Record {
    pub id: u64,
    pub kind: Kind,
    pub parent: String,
    pub labels: BTreeMap<String, String>,
    /// Nanoseconds since the epoch.
    pub created: u64,
    pub updated: u64,
    /// The Starlight image (`NAME@DIGEST`) this snapshot serves, if it is one.
    #[serde(default)]
    pub image: Option<String>,
    /// The process serving the image's mount.
    #[serde(default)]
    pub pid: Option<u32>,
    /// Bytes and inodes, measured at commit.
    #[serde(default)]
    pub usage: Option<(i64, i64)>,
}

/// A snapshot and its name.
#[derive(Clone, Debug)]
pub struct Info {
    pub name: String,
    pub record: Record,
}

/// One mount containerd performs (`containerd.types.Mount`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountSpec {
    pub kind: String,
    pub source: String,
    pub options: Vec<String>,
}

/// The snapshotter's state: snapshots in memory, written through to `metadata.redb`.
pub struct Snapshotter {
    cfg: Config,
    db: Database,
    snaps: Mutex<BTreeMap<String, Record>>,
    /// Starlight targets being mounted: one prepare per target at a time.
    starting: Mutex<HashMap<String, Arc<Mutex<()>>>>,
    store: Arc<Store>,
}

impl std::fmt::Debug for Snapshotter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshotter").field("root", &self.cfg.root).finish_non_exhaustive()
    }
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

impl Snapshotter {
    /// Opens (creating) the snapshotter's root, and mounts again every Starlight image whose
    /// serving process is gone.
    pub fn open(cfg: Config) -> Result<Arc<Snapshotter>, SnapError> {
        let snapdir = cfg.root.join("snapshots");
        std::fs::create_dir_all(&snapdir).map_err(internal(snapdir.display()))?;
        let store =
            Arc::new(Store::open(cfg.root.join("store")).map_err(|e| SnapError::Internal(e.to_string()))?);
        let db = Database::create(cfg.root.join("metadata.redb")).map_err(db_err)?;
        let tx = db.begin_write().map_err(db_err)?;
        tx.open_table(SNAPSHOTS).map_err(db_err)?;
        tx.open_table(COUNTERS).map_err(db_err)?;
        tx.commit().map_err(db_err)?;
        let mut snaps = BTreeMap::new();
        {
            let tx = db.begin_read().map_err(db_err)?;
            let t = tx.open_table(SNAPSHOTS).map_err(db_err)?;
            for item in t.iter().map_err(db_err)? {
                let (k, v) = item.map_err(db_err)?;
                let rec: Record = serde_json::from_slice(v.value())
                    .map_err(|e| SnapError::Internal(format!("snapshot metadata of {:?}: {e}", k.value())))?;
                snaps.insert(k.value().to_string(), rec);
            }
        }
        let sn = Arc::new(Snapshotter {
            cfg,
            db,
            snaps: Mutex::new(snaps),
            starting: Mutex::new(HashMap::new()),
            store,
        });
        sn.recover();
        Ok(sn)
    }

    pub fn root(&self) -> &Path {
        &self.cfg.root
    }

    fn dir(&self, id: u64) -> PathBuf {
        self.cfg.root.join("snapshots").join(id.to_string())
    }

    fn fs(&self, id: u64) -> PathBuf {
        self.dir(id).join("fs")
    }

    fn next_id(&self) -> Result<u64, SnapError> {
        let tx = self.db.begin_write().map_err(db_err)?;
        let id = {
            let mut t = tx.open_table(COUNTERS).map_err(db_err)?;
            let id = t.get("id").map_err(db_err)?.map_or(0, |v| v.value()) + 1;
            t.insert("id", id).map_err(db_err)?;
            id
        };
        tx.commit().map_err(db_err)?;
        Ok(id)
    }

    /// Writes `changes` (name, record or removal) in one transaction, then into memory.
    fn write(
        &self,
        snaps: &mut BTreeMap<String, Record>,
        changes: Vec<(String, Option<Record>)>,
    ) -> Result<(), SnapError> {
        let tx = self.db.begin_write().map_err(db_err)?;
        {
            let mut t = tx.open_table(SNAPSHOTS).map_err(db_err)?;
            for (name, rec) in &changes {
                match rec {
                    Some(r) => {
                        let v = serde_json::to_vec(r).expect("records serialize");
                        t.insert(name.as_str(), v.as_slice()).map_err(db_err)?;
                    }
                    None => {
                        t.remove(name.as_str()).map_err(db_err)?;
                    }
                }
            }
        }
        tx.commit().map_err(db_err)?;
        for (name, rec) in changes {
            match rec {
                Some(r) => snaps.insert(name, r),
                None => snaps.remove(&name),
            };
        }
        Ok(())
    }

    fn get(&self, key: &str) -> Result<Record, SnapError> {
        self.snaps
            .lock()
            .unwrap()
            .get(key)
            .cloned()
            .ok_or_else(|| SnapError::NotFound(format!("snapshot {key:?} does not exist")))
    }

    pub fn stat(&self, key: &str) -> Result<Info, SnapError> {
        Ok(Info { name: key.to_string(), record: self.get(key)? })
    }

    /// Snapshots matching any of `filters` (all when there are none).
    pub fn list(&self, filters: &[String]) -> Result<Vec<Info>, SnapError> {
        let parsed = filters
            .iter()
            .filter(|f| !f.trim().is_empty())
            .map(|f| filter::Filter::parse(f))
            .collect::<Result<Vec<_>, _>>()
            .map_err(SnapError::InvalidArgument)?;
        let snaps = self.snaps.lock().unwrap();
        Ok(snaps
            .iter()
            .filter(|(name, r)| {
                filter::any_matches(
                    &parsed,
                    &filter::Subject { name, parent: &r.parent, kind: r.kind.name(), labels: &r.labels },
                )
            })
            .map(|(name, r)| Info { name: name.clone(), record: r.clone() })
            .collect())
    }

    /// Prepare (`readonly` false) or View (true).
    pub fn create(
        &self,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
        readonly: bool,
    ) -> Result<Vec<MountSpec>, SnapError> {
        if key.is_empty() {
            return Err(SnapError::InvalidArgument("a snapshot key must not be empty".into()));
        }
        if let (Some(image), Some(target)) = (labels.get(IMAGE_LABEL), labels.get(TARGET_LABEL)) {
            return Err(self.starlight(key, parent, image, target, &labels));
        }
        let mut snaps = self.snaps.lock().unwrap();
        if snaps.contains_key(key) {
            return Err(SnapError::AlreadyExists(format!("snapshot {key:?} already exists")));
        }
        if let Some(target) = labels.get(TARGET_LABEL)
            && let Some(e) = existing_target(&snaps, target, parent)
        {
            return Err(e);
        }
        if !parent.is_empty() {
            match snaps.get(parent) {
                None => {
                    return Err(SnapError::NotFound(format!("parent snapshot {parent:?} does not exist")));
                }
                Some(p) if p.kind != Kind::Committed => {
                    return Err(SnapError::InvalidArgument(format!(
                        "parent snapshot {parent:?} is {}, not committed",
                        p.kind.name()
                    )));
                }
                Some(_) => {}
            }
        }
        let id = self.next_id()?;
        let dir = self.dir(id);
        for d in ["fs", "work"] {
            let p = dir.join(d);
            std::fs::create_dir_all(&p).map_err(internal(p.display()))?;
        }
        let t = now();
        let rec = Record {
            id,
            kind: if readonly { Kind::View } else { Kind::Active },
            parent: parent.to_string(),
            labels,
            created: t,
            updated: t,
            image: None,
            pid: None,
            usage: None,
        };
        if let Err(e) = self.write(&mut snaps, vec![(key.to_string(), Some(rec.clone()))]) {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e);
        }
        Ok(self.mounts_of(&snaps, &rec))
    }

    /// A prepare for a Starlight image: mounts it, records the committed snapshot `target` (named
    /// `starlight/TARGET`), and answers "already exists" as remote snapshotters do.
    fn starlight(
        &self,
        key: &str,
        parent: &str,
        image: &str,
        target: &str,
        labels: &BTreeMap<String, String>,
    ) -> SnapError {
        if !parent.is_empty() {
            return SnapError::InvalidArgument(format!(
                "Starlight image {image} is one flattened snapshot: prepare it without a parent (got {parent:?})"
            ));
        }
        match Reference::parse(image) {
            Ok(r) if r.digest().is_some() => {}
            Ok(_) => {
                return SnapError::InvalidArgument(format!("label {IMAGE_LABEL}={image:?}: not NAME@DIGEST"));
            }
            Err(e) => return SnapError::InvalidArgument(format!("label {IMAGE_LABEL}: {e}")),
        }
        let gate = self.starting.lock().unwrap().entry(target.to_string()).or_default().clone();
        let err = {
            let _one = gate.lock().unwrap();
            self.mount_target(key, parent, image, target, labels)
        };
        // The last prepare of this target lets its gate go.
        let mut starting = self.starting.lock().unwrap();
        if Arc::strong_count(&gate) == 2 {
            starting.remove(target);
        }
        err
    }

    /// [`Snapshotter::starlight`], one prepare of `target` at a time.
    fn mount_target(
        &self,
        key: &str,
        parent: &str,
        image: &str,
        target: &str,
        labels: &BTreeMap<String, String>,
    ) -> SnapError {
        let id = {
            let snaps = self.snaps.lock().unwrap();
            if let Some(e) = existing_target(&snaps, target, parent) {
                return e;
            }
            if snaps.contains_key(key) {
                return SnapError::AlreadyExists(format!("snapshot {key:?} already exists"));
            }
            match self.next_id() {
                Ok(id) => id,
                Err(e) => return e,
            }
        };
        let fs = self.fs(id);
        if let Err(e) = std::fs::create_dir_all(&fs) {
            return SnapError::Internal(format!("{}: {e}", fs.display()));
        }
        let pid = match self.spawn_mount(id, image) {
            Ok(pid) => pid,
            Err(e) => {
                let _ = std::fs::remove_dir_all(self.dir(id));
                return e;
            }
        };
        let t = now();
        let mut rlabels = BTreeMap::new();
        rlabels.insert(TARGET_LABEL.to_string(), target.to_string());
        rlabels.insert(IMAGE_LABEL.to_string(), image.to_string());
        for (k, v) in labels {
            rlabels.entry(k.clone()).or_insert_with(|| v.clone());
        }
        let rec = Record {
            id,
            kind: Kind::Committed,
            parent: String::new(),
            labels: rlabels,
            created: t,
            updated: t,
            image: Some(image.to_string()),
            pid: Some(pid),
            usage: None,
        };
        let name = format!("starlight/{target}");
        let mut snaps = self.snaps.lock().unwrap();
        if let Err(e) = self.write(&mut snaps, vec![(name.clone(), Some(rec.clone()))]) {
            drop(snaps);
            self.stop_mount(&rec);
            let _ = std::fs::remove_dir_all(self.dir(id));
            return e;
        }
        tracing::info!(snapshot = %name, image, pid, "Starlight image mounted");
        SnapError::AlreadyExists(format!("target snapshot {target:?} exists ({name}, serving {image})"))
    }

    /// Starts `starlight-pull mount IMAGE fs` for snapshot `id`, and waits until it serves.
    fn spawn_mount(&self, id: u64, image: &str) -> Result<u32, SnapError> {
        let dir = self.dir(id);
        let fs = dir.join("fs");
        let log_path = dir.join("mount.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(internal(log_path.display()))?;
        let log2 = log.try_clone().map_err(internal(log_path.display()))?;
        let mut cmd = Command::new(&self.cfg.pull_bin);
        cmd.arg("--gateway").arg(&self.cfg.gateway).arg("--store").arg(self.store.root());
        if let Some(p) = &self.cfg.platform {
            cmd.arg("--platform").arg(p);
        }
        if let Some(p) = &self.cfg.ca_file {
            cmd.arg("--ca-file").arg(p);
        }
        if self.cfg.allow_plain_http_credentials {
            cmd.arg(crate::client::ALLOW_PLAIN_HTTP_CREDENTIALS);
        }
        match &self.cfg.credentials {
            Some(c) => cmd.env("STARLIGHT_CREDENTIALS", c),
            None => cmd.env_remove("STARLIGHT_CREDENTIALS"),
        };
        cmd.arg("mount")
            .arg(image)
            .arg(&fs)
            .arg("--allow-other")
            .arg("--read-timeout")
            .arg(self.cfg.read_timeout.to_string())
            .args(self.cfg.upload_traces.then_some("--upload-trace"))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            // Its own process group: signals to the snapshotter's group do not reach it, and it
            // outlives a snapshotter restart (running containers keep their root filesystem).
            .process_group(0);
        let mut child = cmd.spawn().map_err(|e| {
            SnapError::Internal(format!("starting {} to mount {image}: {e}", self.cfg.pull_bin.display()))
        })?;
        let pid = child.id();
        let started = Instant::now();
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(3).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                return Err(SnapError::FailedPrecondition(format!(
                    "mounting Starlight image {image} failed ({status}): {}",
                    tail.join(" | ")
                )));
            }
            if is_mounted(&fs) {
                break;
            }
            let wait = if started.elapsed() < Duration::from_secs(1) { 10 } else { 50 };
            std::thread::sleep(Duration::from_millis(wait));
        }
        // Reap it when it ends (while this process lives; after a restart, init does).
        std::thread::spawn(move || {
            let status = child.wait();
            tracing::info!(pid, ?status, "a Starlight mount process ended");
        });
        Ok(pid)
    }

    /// Stops the process serving `rec`'s image, and makes sure nothing stays mounted.
    fn stop_mount(&self, rec: &Record) {
        let fs = self.fs(rec.id);
        if let Some(pid) = rec.pid.filter(|p| serves(*p, &fs)) {
            // SAFETY: a signal to a process we checked serves this snapshot's mount point.
            unsafe { libc::kill(pid as i32, libc::SIGTERM) };
            let t = Instant::now();
            while t.elapsed() < Duration::from_secs(10) && serves(pid, &fs) {
                std::thread::sleep(Duration::from_millis(20));
            }
            if serves(pid, &fs) {
                // SAFETY: as above.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
        }
        detach(&fs);
    }

    /// Mounts again every Starlight image whose process is gone; stale mounts are detached first.
    fn recover(&self) {
        let snaps: Vec<(String, Record)> = self
            .snaps
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, r)| r.image.is_some())
            .map(|(k, r)| (k.clone(), r.clone()))
            .collect();
        for (name, mut rec) in snaps {
            let fs = self.fs(rec.id);
            let alive = rec.pid.is_some_and(|p| serves(p, &fs));
            if alive && is_mounted(&fs) {
                tracing::info!(snapshot = %name, pid = rec.pid, "Starlight mount still served");
                continue;
            }
            if let Some(pid) = rec.pid.filter(|p| serves(*p, &fs)) {
                // SAFETY: the process serves this snapshot's mount point but it is not mounted.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
            detach(&fs);
            let image = rec.image.clone().unwrap_or_default();
            match self.spawn_mount(rec.id, &image) {
                Ok(pid) => {
                    tracing::info!(snapshot = %name, image, pid, "Starlight image mounted again");
                    rec.pid = Some(pid);
                    let mut snaps = self.snaps.lock().unwrap();
                    if let Err(e) = self.write(&mut snaps, vec![(name.clone(), Some(rec))]) {
                        tracing::error!(snapshot = %name, error = %e, "recording the new mount process");
                    }
                }
                Err(e) => tracing::error!(snapshot = %name, image, error = %e, "mounting again failed"),
            }
        }
    }

    pub fn mounts(&self, key: &str) -> Result<Vec<MountSpec>, SnapError> {
        let snaps = self.snaps.lock().unwrap();
        let rec =
            snaps.get(key).ok_or_else(|| SnapError::NotFound(format!("snapshot {key:?} does not exist")))?;
        Ok(self.mounts_of(&snaps, rec))
    }

    /// The directories of `rec`'s parents, nearest first.
    fn lowers(&self, snaps: &BTreeMap<String, Record>, rec: &Record) -> Vec<String> {
        let mut out = Vec::new();
        let mut p = rec.parent.clone();
        while let Some(r) = (!p.is_empty()).then(|| snaps.get(&p)).flatten() {
            out.push(self.fs(r.id).display().to_string());
            p = r.parent.clone();
        }
        out
    }

    fn mounts_of(&self, snaps: &BTreeMap<String, Record>, rec: &Record) -> Vec<MountSpec> {
        let own = self.fs(rec.id).display().to_string();
        let mut lowers = self.lowers(snaps, rec);
        let bind = |src: String, mode: &str| MountSpec {
            kind: "bind".into(),
            source: src,
            options: vec![mode.into(), "rbind".into()],
        };
        match rec.kind {
            Kind::Active if lowers.is_empty() => vec![bind(own, "rw")],
            Kind::Active => vec![MountSpec {
                kind: "overlay".into(),
                source: "overlay".into(),
                options: vec![
                    "index=off".into(),
                    format!("workdir={}", self.dir(rec.id).join("work").display()),
                    format!("upperdir={own}"),
                    format!("lowerdir={}", lowers.join(":")),
                ],
            }],
            // A committed snapshot shows its own layer over its parents'.
            Kind::Committed | Kind::View => {
                if rec.kind == Kind::Committed {
                    lowers.insert(0, own.clone());
                }
                match lowers.len() {
                    0 => vec![bind(own, "ro")],
                    1 => vec![bind(lowers.remove(0), "ro")],
                    _ => vec![MountSpec {
                        kind: "overlay".into(),
                        source: "overlay".into(),
                        options: vec!["index=off".into(), format!("lowerdir={}", lowers.join(":"))],
                    }],
                }
            }
        }
    }

    pub fn commit(&self, name: &str, key: &str, labels: BTreeMap<String, String>) -> Result<(), SnapError> {
        let mut snaps = self.snaps.lock().unwrap();
        let rec =
            snaps.get(key).ok_or_else(|| SnapError::NotFound(format!("snapshot {key:?} does not exist")))?;
        if rec.kind != Kind::Active {
            return Err(SnapError::FailedPrecondition(format!(
                "snapshot {key:?} is {}: only active snapshots can be committed",
                rec.kind.name()
            )));
        }
        if snaps.contains_key(name) {
            return Err(SnapError::AlreadyExists(format!("snapshot {name:?} already exists")));
        }
        let mut rec = rec.clone();
        rec.usage = Some(disk_usage(&self.fs(rec.id)));
        rec.kind = Kind::Committed;
        rec.updated = now();
        if !labels.is_empty() {
            rec.labels = labels;
        }
        // The work directory is needed no more.
        let _ = std::fs::remove_dir_all(self.dir(rec.id).join("work"));
        self.write(&mut snaps, vec![(key.to_string(), None), (name.to_string(), Some(rec))])
    }

    pub fn remove(&self, key: &str) -> Result<(), SnapError> {
        let rec = {
            let mut snaps = self.snaps.lock().unwrap();
            let rec = snaps
                .get(key)
                .cloned()
                .ok_or_else(|| SnapError::NotFound(format!("snapshot {key:?} does not exist")))?;
            if let Some(child) = snaps.iter().find(|(_, r)| r.parent == key).map(|(k, _)| k) {
                return Err(SnapError::FailedPrecondition(format!(
                    "snapshot {key:?} has a child ({child:?}): remove it first"
                )));
            }
            self.write(&mut snaps, vec![(key.to_string(), None)])?;
            rec
        };
        if let Some(image) = &rec.image {
            self.stop_mount(&rec);
            self.forget_image(image);
        }
        let dir = self.dir(rec.id);
        if is_mounted(&self.fs(rec.id)) {
            // Never delete through a mount; Cleanup retries.
            return Err(SnapError::Internal(format!("{} is still mounted; left for cleanup", dir.display())));
        }
        std::fs::remove_dir_all(&dir).map_err(internal(dir.display()))
    }

    /// Drops a Starlight image from the store once no snapshot serves it, then frees the contents
    /// no image needs any more. In the background: the store waits for pulls running in it.
    fn forget_image(&self, image: &str) {
        let still_used = self.snaps.lock().unwrap().values().any(|r| r.image.as_deref() == Some(image));
        let Ok(r) = Reference::parse(image) else { return };
        if still_used {
            return;
        }
        let store = self.store.clone();
        let image = image.to_string();
        std::thread::spawn(move || {
            match store.remove(&r) {
                Ok(_) | Err(crate::store::StoreError::NotFound(_)) => {}
                Err(e) => tracing::warn!(image, error = %e, "removing the image from the store"),
            }
            store.forget_partial(&r);
            match store.gc() {
                Ok((n, bytes)) => tracing::info!(image, contents = n, bytes, "store garbage collected"),
                Err(e) => tracing::warn!(error = %e, "store garbage collection"),
            }
        });
    }

    /// Frees the store's unused contents, unless a pull runs (then at the next removal or cleanup).
    fn gc(&self) {
        match self.store.try_gc() {
            Ok(Some((n, bytes))) => tracing::info!(contents = n, bytes, "store garbage collected"),
            Ok(None) => {
                tracing::info!("store garbage collection deferred: a pull or a removal holds the store")
            }
            Err(e) => tracing::warn!(error = %e, "store garbage collection"),
        }
    }

    /// Changes labels (the only changeable field): `paths` empty or `labels` replaces them all,
    /// `labels.KEY` sets (or, absent from `labels`, removes) one.
    pub fn update(
        &self,
        key: &str,
        labels: BTreeMap<String, String>,
        paths: &[String],
    ) -> Result<Info, SnapError> {
        let mut snaps = self.snaps.lock().unwrap();
        let mut rec = snaps
            .get(key)
            .cloned()
            .ok_or_else(|| SnapError::NotFound(format!("snapshot {key:?} does not exist")))?;
        if paths.is_empty() || paths.iter().any(|p| p == "labels") {
            rec.labels = labels;
        } else {
            for p in paths {
                let k = p.strip_prefix("labels.").ok_or_else(|| {
                    SnapError::InvalidArgument(format!(
                        "cannot update {p:?} of snapshot {key:?}: only labels change"
                    ))
                })?;
                match labels.get(k) {
                    Some(v) => rec.labels.insert(k.to_string(), v.clone()),
                    None => rec.labels.remove(k),
                };
            }
        }
        rec.updated = now();
        self.write(&mut snaps, vec![(key.to_string(), Some(rec.clone()))])?;
        Ok(Info { name: key.to_string(), record: rec })
    }

    /// Bytes and inodes: measured at commit for committed snapshots, now for the others and for
    /// Starlight images (whose sizes the mount answers from metadata, without reading contents).
    pub fn usage(&self, key: &str) -> Result<(i64, i64), SnapError> {
        let rec = self.get(key)?;
        match (rec.kind, rec.usage) {
            (Kind::Committed, Some(u)) => Ok(u),
            _ => Ok(disk_usage(&self.fs(rec.id))),
        }
    }

    /// Removes directories no snapshot owns, and frees unused store contents.
    pub fn cleanup(&self) -> Result<(), SnapError> {
        let ids: std::collections::HashSet<u64> = self.snaps.lock().unwrap().values().map(|r| r.id).collect();
        let dir = self.cfg.root.join("snapshots");
        for e in std::fs::read_dir(&dir).map_err(internal(dir.display()))?.flatten() {
            let owned = e
                .file_name()
                .to_str()
                .and_then(|n| n.parse::<u64>().ok())
                .is_some_and(|id| ids.contains(&id));
            if !owned {
                let fs = e.path().join("fs");
                detach(&fs);
                if !is_mounted(&fs) {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        self.gc();
        Ok(())
    }
}

/// An error when a committed snapshot for `target` with this parent exists already.
fn existing_target(snaps: &BTreeMap<String, Record>, target: &str, parent: &str) -> Option<SnapError> {
    snaps
        .iter()
        .find(|(_, r)| {
            r.kind == Kind::Committed
                && r.parent == parent
                && r.labels.get(TARGET_LABEL).map(String::as_str) == Some(target)
        })
        .map(|(name, _)| SnapError::AlreadyExists(format!("target snapshot {target:?} exists ({name})")))
}

/// Whether something is mounted on `dir` (its device differs from its parent's), or a mount on
/// it is dead (`ENOTCONN`).
fn is_mounted(dir: &Path) -> bool {
    let parent = dir.parent().unwrap_or(dir);
    match (std::fs::metadata(dir), std::fs::metadata(parent)) {
        (Ok(a), Ok(b)) => a.dev() != b.dev(),
        (Err(e), _) => e.raw_os_error() == Some(libc::ENOTCONN),
        _ => false,
    }
}

/// Detaches whatever is mounted on `dir` (a dead FUSE mount after its process died).
fn detach(dir: &Path) {
    if !is_mounted(dir) {
        return;
    }
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()) else { return };
    // SAFETY: a valid C string; MNT_DETACH only unhooks the mount.
    if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
        tracing::warn!(dir = %dir.display(), error = %std::io::Error::last_os_error(), "detaching a mount");
    }
}

/// The live processes serving the mounts of a snapshotter whose root is `root`: their command line
/// has the `mount` subcommand and an argument under `root/snapshots`. For tests and benchmarks
/// that must see those processes go, or stop them, when they tear a snapshotter down.
pub fn mount_processes(root: &Path) -> Vec<i32> {
    let want = root.join("snapshots");
    let want = want.as_os_str().as_encoded_bytes();
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|p| p.parse::<i32>().ok()) else { continue };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else { continue };
        let mut args = cmd.split(|b| *b == 0);
        if args.clone().any(|a| a == b"mount") && args.any(|a| a.starts_with(want)) {
            pids.push(pid);
        }
    }
    pids
}

/// Whether process `pid` is alive and serves mount point `fs` (its command line names it).
fn serves(pid: u32, fs: &Path) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else { return false };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // A zombie has ended.
    let zombie = stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'));
    let want = fs.as_os_str().as_encoded_bytes();
    !zombie && cmdline.split(|b| *b == 0).any(|arg| arg == want)
}

/// Bytes (allocated blocks) and inodes under `dir`, not crossing into other filesystems, each
/// hard-linked inode once.
fn disk_usage(dir: &Path) -> (i64, i64) {
    let Ok(root) = std::fs::symlink_metadata(dir) else { return (0, 0) };
    let dev = root.dev();
    let mut seen = std::collections::HashSet::new();
    let (mut bytes, mut inodes) = (0i64, 0i64);
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let Ok(m) = e.metadata() else { continue };
            if m.dev() != dev || !seen.insert(m.ino()) {
                continue;
            }
            inodes += 1;
            // A Starlight image has no blocks of its own: count its sizes.
            bytes += if m.blocks() == 0 { m.len() as i64 } else { (m.blocks() * 512) as i64 };
            if m.is_dir() {
                stack.push(e.path());
            }
        }
    }
    (bytes, inodes)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A snapshotter whose mounts cannot start (no such binary, no gateway).
    fn config(root: &Path) -> Config {
        Config {
            root: root.to_path_buf(),
            gateway: "http://127.0.0.1:9".into(),
            credentials: None,
            ca_file: None,
            allow_plain_http_credentials: false,
            platform: None,
            pull_bin: "/nonexistent/starlight-pull".into(),
            read_timeout: 5,
            upload_traces: false,
        }
    }

    fn snapshotter() -> (tempfile::TempDir, Arc<Snapshotter>) {
        let dir = tempfile::tempdir().unwrap();
        let sn = Snapshotter::open(config(dir.path())).unwrap();
        (dir, sn)
    }

    fn labels(kv: &[(&str, &str)]) -> BTreeMap<String, String> {
        kv.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn overlay_semantics_and_persistent_metadata() {
        let (dir, sn) = snapshotter();
        let m = sn.create("a", "", BTreeMap::new(), false).unwrap();
        assert_eq!(m[0].kind, "bind");
        assert!(m[0].options.contains(&"rw".to_string()));
        std::fs::write(sn.fs(1).join("f"), b"layer one").unwrap();
        // A parent must be committed.
        assert!(matches!(sn.create("b", "a", BTreeMap::new(), false), Err(SnapError::InvalidArgument(_))));
        sn.commit("layer1", "a", labels(&[(TARGET_LABEL, "sha256:l1")])).unwrap();
        assert!(matches!(sn.stat("a"), Err(SnapError::NotFound(_))));
        let info = sn.stat("layer1").unwrap();
        assert_eq!(info.record.kind, Kind::Committed);
        assert!(info.record.usage.unwrap().1 >= 1);
        // The same target again: "already exists", as containerd's unpacker expects.
        let again = sn.create("extract-2", "", labels(&[(TARGET_LABEL, "sha256:l1")]), false);
        assert!(matches!(again, Err(SnapError::AlreadyExists(_))), "{again:?}");
        let m = sn.create("b", "layer1", BTreeMap::new(), false).unwrap();
        assert_eq!(m[0].kind, "overlay");
        let lower = format!("lowerdir={}", sn.fs(1).display());
        assert!(m[0].options.contains(&lower), "{:?}", m[0].options);
        assert!(m[0].options.iter().any(|o| o.starts_with("upperdir=")));
        sn.commit("layer2", "b", BTreeMap::new()).unwrap();
        let v = sn.create("v", "layer2", BTreeMap::new(), true).unwrap();
        assert_eq!(v[0].kind, "overlay");
        assert!(v[0].options.iter().any(|o| o.starts_with("lowerdir=") && o.contains(':')));
        assert!(!v[0].options.iter().any(|o| o.starts_with("upperdir=")));
        // A snapshot with children stays.
        assert!(matches!(sn.remove("layer1"), Err(SnapError::FailedPrecondition(_))));
        // Labels change; nothing else does.
        let i = sn.update("layer2", labels(&[("x", "1")]), &["labels.x".into()]).unwrap();
        assert_eq!(i.record.labels.get("x").map(String::as_str), Some("1"));
        assert!(matches!(
            sn.update("layer2", BTreeMap::new(), &["parent".into()]),
            Err(SnapError::InvalidArgument(_))
        ));
        let listed =
            sn.list(&[r#"labels."containerd.io/snapshot.ref"==sha256:l1,parent=="""#.into()]).unwrap();
        assert_eq!(listed.iter().map(|i| i.name.as_str()).collect::<Vec<_>>(), ["layer1"]);
        assert!(sn.list(&["size==1".into()]).is_err());
        drop(sn);
        // Everything is there after a restart.
        let sn = Snapshotter::open(config(dir.path())).unwrap();
        let names: Vec<String> = sn.list(&[]).unwrap().into_iter().map(|i| i.name).collect();
        assert_eq!(names, ["layer1", "layer2", "v"]);
        assert_eq!(sn.stat("layer2").unwrap().record.labels.get("x").map(String::as_str), Some("1"));
        sn.remove("v").unwrap();
        sn.remove("layer2").unwrap();
        sn.remove("layer1").unwrap();
        assert!(sn.list(&[]).unwrap().is_empty());
        // A new id never reuses an old directory.
        sn.create("c", "", BTreeMap::new(), false).unwrap();
        assert_eq!(sn.stat("c").unwrap().record.id, 4);
        std::fs::create_dir_all(dir.path().join("snapshots/99/fs")).unwrap();
        sn.cleanup().unwrap();
        assert!(!dir.path().join("snapshots/99").exists());
        assert!(sn.fs(4).exists());
    }

    #[test]
    fn a_starlight_prepare_that_cannot_mount_fails_clearly_and_leaves_nothing() {
        let (dir, sn) = snapshotter();
        let l = labels(&[(TARGET_LABEL, "sha256:c"), (IMAGE_LABEL, "x@sha256:0000")]);
        let e = sn.create("k", "", l, false).unwrap_err();
        assert!(matches!(e, SnapError::InvalidArgument(_)), "{e}");
        let image = format!("x@sha256:{}", "0".repeat(64));
        let l = labels(&[(TARGET_LABEL, "sha256:c"), (IMAGE_LABEL, &image)]);
        let e = sn.create("k", "", l.clone(), false).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/starlight-pull"), "{e}");
        assert!(matches!(sn.create("k", "p", l, false), Err(SnapError::InvalidArgument(_))));
        assert!(sn.list(&[]).unwrap().is_empty());
        assert_eq!(std::fs::read_dir(dir.path().join("snapshots")).unwrap().count(), 0);
    }

    #[test]
    fn mounts_get_the_ca_file_and_the_plain_http_override_as_the_gateway_url() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        // A stand-in for starlight-pull that prints how it was started, and fails.
        let bin = dir.path().join("fake-pull");
        std::fs::write(&bin, "#!/bin/sh\necho \"args: $*\"\nexit 1\n").unwrap();
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        let cfg = Config {
            ca_file: Some("/etc/starlight/ca.pem".into()),
            allow_plain_http_credentials: true,
            pull_bin: bin,
            ..config(&dir.path().join("root"))
        };
        let sn = Snapshotter::open(cfg).unwrap();
        let image = format!("x@sha256:{}", "0".repeat(64));
        let e = sn.create("k", "", labels(&[(TARGET_LABEL, "sha256:c"), (IMAGE_LABEL, &image)]), false);
        let e = e.unwrap_err().to_string();
        assert!(e.contains("--gateway http://127.0.0.1:9 "), "{e}");
        assert!(e.contains("--ca-file /etc/starlight/ca.pem "), "{e}");
        assert!(e.contains(" --allow-plain-http-credentials "), "{e}");
    }
}
