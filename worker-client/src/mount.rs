//! Mounting an image: the pull runs in the background and the filesystem is served from the
//! moment its header arrives. An image already whole in the store is served from the store alone.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use fuser::{BackgroundSession, Config, MountOption, SessionACL};
use starlight_format::Digest;
use starlight_format::bundle::Header;

use crate::client::Gateway;
use crate::fs::{Contents, ImageFs, Trace, Tree};
use crate::pull::{Observer, PullError, PullOptions, Report, Stats, pull};
use crate::store::{Reference, Store};

/// Why a mount failed.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error(transparent)]
    Pull(#[from] PullError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("image {0} is not whole in the store and no gateway is set to pull it from")]
    NoGateway(String),
    #[error("image {image}: {why}")]
    Header { image: String, why: String },
    #[error("mounting on {path}: {source}")]
    Fuse {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// What to mount and how.
#[derive(Clone, Debug)]
pub struct MountOptions {
    pub image: Reference,
    pub gateway: Option<Gateway>,
    pub pull: PullOptions,
    /// How long a read may wait for its content before it fails with EIO.
    pub read_timeout: Duration,
    /// Let every user (and overlayfs, containers) use the mount, not only its owner.
    pub allow_other: bool,
}

/// A mounted image. Unmounted on drop.
pub struct Mounted {
    session: Option<BackgroundSession>,
    pub contents: Arc<Contents>,
    pub trace: Arc<Trace>,
    pub digest: Digest,
    pub mountpoint: PathBuf,
    store: Arc<Store>,
    pull: Option<std::thread::JoinHandle<Result<Report, String>>>,
}

impl std::fmt::Debug for Mounted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mounted").field("digest", &self.digest).field("mountpoint", &self.mountpoint).finish()
    }
}

/// Passes the pull's events to the filesystem.
struct Feed {
    header: Mutex<Option<std::sync::mpsc::SyncSender<Arc<Header>>>>,
    contents: Arc<OnceLock<Arc<Contents>>>,
}

impl Observer for Feed {
    fn header(&self, header: &Arc<Header>) {
        if let Some(tx) = self.header.lock().unwrap().take() {
            let _ = tx.send(header.clone());
        }
    }
    fn content(&self, digest: &Digest, path: &Path) {
        if let Some(c) = self.contents.get() {
            c.arrived(digest, path);
        }
    }
    fn progress(&self, _stats: &Stats) {}
}

/// Mounts `opts.image` read-only at `mountpoint`; returns once the filesystem is being served.
pub fn mount(store: Arc<Store>, opts: MountOptions, mountpoint: &Path) -> Result<Mounted, MountError> {
    let whole = store.find(&opts.image)?;
    let contents_cell: Arc<OnceLock<Arc<Contents>>> = Arc::new(OnceLock::new());
    let (header, pull_thread) = match whole {
        Some(meta) => {
            let d: Digest = meta.digest.parse().map_err(|e| MountError::Header {
                image: opts.image.to_string(),
                why: format!("bad digest in the store: {e}"),
            })?;
            (Arc::new(store.header(&d)?), None)
        }
        None => {
            let gw = opts.gateway.clone().ok_or_else(|| MountError::NoGateway(opts.image.to_string()))?;
            let (tx, rx) = std::sync::mpsc::sync_channel(1);
            let feed = Feed { header: Mutex::new(Some(tx)), contents: contents_cell.clone() };
            let (store2, image, popts, cell) =
                (store.clone(), opts.image.clone(), opts.pull.clone(), contents_cell.clone());
            let handle = std::thread::Builder::new()
                .name("starlight-pull".into())
                .spawn(move || -> Result<Report, String> {
                    let rt = tokio::runtime::Builder::new_multi_thread()
                        .worker_threads(2)
                        .enable_all()
                        .build()
                        .map_err(|e| format!("tokio runtime: {e}"))?;
                    let r = rt.block_on(pull(&store2, &gw, &image, &popts, &feed));
                    // Wake anyone still waiting for the header.
                    drop(feed.header.lock().unwrap().take());
                    if let Err(e) = &r
                        && let Some(c) = cell.get()
                    {
                        c.failed(&e.to_string());
                    }
                    r.map_err(|e| e.to_string())
                })
                .map_err(|source| MountError::Fuse { path: mountpoint.display().to_string(), source })?;
            match rx.recv() {
                Ok(h) => (h, Some(handle)),
                Err(_) => {
                    let why = handle.join().map_or_else(
                        |_| "the pull panicked".into(),
                        |r| match r {
                            Err(e) => e,
                            Ok(_) => "the pull ended without a header".into(),
                        },
                    );
                    return Err(MountError::Header { image: opts.image.to_string(), why });
                }
            }
        }
    };
    let tree = Tree::new(&header).map_err(|why| MountError::Header { image: opts.image.to_string(), why })?;
    let fetcher = match (&pull_thread, &opts.gateway) {
        (Some(_), Some(gw)) => {
            Some(out_of_band(store.clone(), gw.clone(), &opts, Arc::downgrade(&contents_cell)))
        }
        _ => None,
    };
    let s2 = store.clone();
    let contents = Contents::new(
        &header,
        move |d, size| s2.has(d, size).then(|| s2.content_path(d)),
        fetcher,
        opts.read_timeout,
    );
    let _ = contents_cell.set(contents.clone());
    if pull_thread.is_some() {
        // Contents that arrived between `Contents::new` looking and the cell being set.
        for (d, size) in crate::store::image_contents(&header) {
            if !contents.is_ready(&d) && store.has(&d, size) {
                contents.arrived(&d, &store.content_path(&d));
            }
        }
    }
    let trace = Arc::new(Trace::default());
    let fs = ImageFs::new(Arc::new(tree), contents.clone(), trace.clone());
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::RO,
        MountOption::FSName(format!("starlight:{}", opts.image)),
        MountOption::Subtype("starlight".into()),
        MountOption::DefaultPermissions,
    ];
    if opts.allow_other {
        config.acl = SessionACL::All;
    }
    config.n_threads = Some(4);
    let session = fuser::spawn_mount(fs, mountpoint, &config)
        .map_err(|source| MountError::Fuse { path: mountpoint.display().to_string(), source })?;
    Ok(Mounted {
        session: Some(session),
        contents,
        trace,
        digest: header.manifest_digest,
        mountpoint: mountpoint.to_path_buf(),
        store,
        pull: pull_thread,
    })
}

/// A fetcher that asks the gateway for one content and hands it to the filesystem.
fn out_of_band(
    store: Arc<Store>,
    gw: Gateway,
    opts: &MountOptions,
    cell: Weak<OnceLock<Arc<Contents>>>,
) -> Box<crate::fs::Fetcher> {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().ok();
    let (image, platform) = (opts.image.clone(), opts.pull.platform.clone());
    Box::new(move |d: Digest, size: u64| {
        let Some(rt) = &rt else { return };
        let (store, gw, image, platform, cell) =
            (store.clone(), gw.clone(), image.clone(), platform.clone(), cell.clone());
        rt.spawn(async move {
            let r = crate::pull::fetch_content(&store, &gw, &image, &d, size, platform.as_deref()).await;
            let Some(c) = cell.upgrade().and_then(|c| c.get().cloned()) else { return };
            match r {
                Ok(p) => c.arrived(&d, &p),
                Err(e) => c.fetch_failed(&d, &e.to_string()),
            }
        });
    })
}

impl Mounted {
    /// Waits for the background pull; `None` when the image was whole already.
    pub fn wait_pull(&mut self) -> Option<Result<Report, String>> {
        let h = self.pull.take()?;
        Some(h.join().unwrap_or_else(|_| Err("the pull panicked".into())))
    }

    /// The background pull's thread, to wait for elsewhere; `None` when the image was whole.
    pub fn take_pull(&mut self) -> Option<std::thread::JoinHandle<Result<Report, String>>> {
        self.pull.take()
    }

    /// Unmounts, and keeps the recorded trace in the store. Returns the trace.
    pub fn unmount(mut self) -> Result<Vec<Vec<u8>>, MountError> {
        self.stop()
    }

    fn stop(&mut self) -> Result<Vec<Vec<u8>>, MountError> {
        if let Some(s) = self.session.take() {
            s.umount_and_join()
                .map_err(|source| MountError::Fuse { path: self.mountpoint.display().to_string(), source })?;
        }
        let paths = self.trace.paths();
        if !paths.is_empty() {
            crate::trace::save(&self.store, &self.digest, &paths)?;
        }
        Ok(paths)
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}
