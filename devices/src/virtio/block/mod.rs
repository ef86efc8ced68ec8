//! virtio-blk (Virtio 1.2 §5.2): a disk image (raw or qcow2) as a block device.
//!
//! - [`Block`] is the [`VirtioDevice`]: feature bits, configuration space, lifecycle.
//! - [`request`] takes a descriptor chain apart, [`RequestProcessor`] serves it on the [`Disk`].
//! - One I/O thread per device, named `blk-<id>`, serves all of the device's queues between
//!   `activate` and `reset` (see the `worker` module). Requests are served asynchronously:
//!   each queue has its own engine ([`AioBackend`]: io_uring, or a thread pool where io_uring is
//!   unavailable) that runs every request the driver made available at once, with `iovec`s
//!   straight into guest memory, and completes them in whatever order the host finishes them.
//!
//! Lifecycle: [`Block::new`] opens the image; `activate` starts the thread; `reset` (or drop)
//! stops and joins it, after which the device never touches guest memory again — the image
//! stays open so the driver can re-initialise the device. [`Block::shutdown`] also closes the
//! image, for hot-unplug: the device cannot be activated again.
//!
//! Queue-level driver bugs set DEVICE_NEEDS_RESET: see [`VirtioDevice::needs_reset`].

mod config_space;
#[cfg(test)]
mod depth_tests;
mod disk;
mod executor;
mod host_io;
mod image_format;
#[cfg(test)]
mod image_tests;
mod in_flight;
mod qcow2;
mod qcow2_engine;
pub mod request;
mod stats;
#[cfg(test)]
mod testing;
mod thread_pool;
mod uring;
mod worker;

use std::fs::File;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use log::{info, warn};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_queue::QueueT;

use super::features::{VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use super::{
    ActivateError, ActiveQueue, GuestMemory, InFlightOutcome, InFlightPolicy, QueueProgress,
    VirtioDevice, VirtioInterrupt,
};
use config_space::{ConfigSpace, ConfigValues};
use host_io::EngineSource;
use worker::{Parked, Pulled, Worker, WorkerContext};

pub use disk::{open_image, Disk, SECTOR_SIZE};
pub use executor::{Completion, RequestProcessor};
pub use host_io::AioBackend;
pub use image_format::{is_format_header, ImageFormat};
pub use stats::{BlockStats, BlockStatsSnapshot};

/// Virtio device ID of a block device (§5.2.1).
pub const VIRTIO_ID_BLOCK: u32 = 2;
/// Queue size offered when the configuration does not say.
pub const DEFAULT_QUEUE_SIZE: u16 = 256;
/// Largest split-virtqueue size (§2.7: "Queue Size ... maximum 32768").
pub const MAX_QUEUE_SIZE: u16 = 32768;
/// Logical block size reported in `blk_size` (§5.2.4, VIRTIO_BLK_F_BLK_SIZE).
pub const BLOCK_SIZE: u32 = 512;
/// `max_discard_sectors` (§5.2.4): 1 GiB per segment.
pub const MAX_DISCARD_SECTORS: u32 = 1 << 21;
/// `max_discard_seg` (§5.2.4).
pub const MAX_DISCARD_SEG: u32 = 32;
/// `discard_sector_alignment` (§5.2.4), in sectors: 4 KiB, the usual filesystem block.
pub const DISCARD_SECTOR_ALIGNMENT: u32 = 8;
/// `max_write_zeroes_sectors` (§5.2.4): 1 GiB per segment, so that even the slow path (writing
/// zeros) keeps a request short enough for a reset to be prompt.
pub const MAX_WRITE_ZEROES_SECTORS: u32 = 1 << 21;
/// `max_write_zeroes_seg` (§5.2.4).
pub const MAX_WRITE_ZEROES_SEG: u32 = 32;

/// What a virtio-blk device is built from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockConfig {
    /// Image file.
    pub path: PathBuf,
    /// Its format; `None` probes it ([`ImageFormat::probe`]: qcow2 by its header, raw
    /// otherwise, and then the guest may not write a format's header to sector 0).
    pub format: Option<ImageFormat>,
    /// Device id: logs, the control socket, and the serial GET_ID returns (first
    /// `VIRTIO_BLK_ID_BYTES` = 20 bytes).
    pub id: String,
    /// Offer VIRTIO_BLK_F_RO and refuse every write.
    pub readonly: bool,
    /// Number of request queues (the VMM passes its vCPU count); VIRTIO_BLK_F_MQ when > 1.
    pub num_queues: u16,
    /// Maximum size of each queue: a power of two, at most [`MAX_QUEUE_SIZE`].
    pub queue_size: u16,
    /// The engine the host I/O runs on.
    pub aio: AioBackend,
}

impl BlockConfig {
    /// A read-write, single-queue configuration with the default queue size, the format
    /// probed.
    pub fn new(path: impl Into<PathBuf>, id: impl Into<String>) -> Self {
        BlockConfig {
            path: path.into(),
            format: None,
            id: id.into(),
            readonly: false,
            num_queues: 1,
            queue_size: DEFAULT_QUEUE_SIZE,
            aio: AioBackend::Auto,
        }
    }

    /// `seg_max`: a request is header + data + status, and without indirect descriptors the
    /// whole chain must fit in the queue (the value Linux and QEMU agree on).
    fn seg_max(&self) -> u32 {
        u32::from(self.queue_size).saturating_sub(2).max(1)
    }
}

/// Errors of [`Block::new`].
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The image cannot be opened or examined.
    #[error("virtio-blk {id}: cannot open {path}: {source}")]
    Open {
        /// Device id.
        id: String,
        /// Image path.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The configuration is unusable.
    #[error("virtio-blk {id}: {reason}")]
    Config {
        /// Device id.
        id: String,
        /// What is wrong.
        reason: &'static str,
    },
}

/// Hears of failures of a device's backing file: host I/O that failed for reasons of the
/// host's (a network block device whose server died, a disk going bad), not the guest's. The
/// request is completed with `VIRTIO_BLK_S_IOERR` regardless; the VMM may report the failure or
/// take the device away. Called on the device's I/O thread for every failure: return promptly.
pub trait BackendErrorObserver: Send + Sync {
    /// `operation` ("read", "write", "flush", ...) failed with `error`.
    fn backend_error(&self, operation: &str, error: &std::io::Error);
}

impl std::fmt::Debug for dyn BackendErrorObserver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BackendErrorObserver")
    }
}

/// A virtio-blk device.
pub struct Block {
    config: BlockConfig,
    /// `None` once [`Block::shutdown`] released the image.
    disk: Option<Arc<Disk>>,
    /// The image's format, and whether it was probed (kept after the image is released).
    format: (ImageFormat, bool),
    avail_features: u64,
    /// Capacity in sectors, as the configuration space reports it.
    capacity: u64,
    config_space: ConfigSpace,
    stats: Arc<BlockStats>,
    needs_reset: Arc<AtomicBool>,
    worker: Option<Worker>,
    /// The I/O thread's context while the device is paused, or while it fails on notify.
    parked: Option<Parked>,
    /// Pulled out and failing requests on the thread that notifies it ([`VirtioDevice::fail_on_notify`]):
    /// no I/O thread runs, `parked` holds the queues. With the failed-on-removal count then.
    fails_on_notify: Option<u64>,
    backend_errors: Option<Arc<dyn BackendErrorObserver>>,
    /// Where the queues' engines come from (`config.aio`, unless a test says otherwise).
    engines: EngineSource,
}

impl Block {
    /// Opens the image at `config.path` (read-only if `config.readonly`).
    pub fn new(config: BlockConfig) -> Result<Self, BlockError> {
        let disk =
            Disk::open_format(&config.path, config.readonly, config.format).map_err(|source| {
                BlockError::Open {
                    id: config.id.clone(),
                    path: config.path.clone(),
                    source,
                }
            })?;
        Self::with_disk(config, disk)
    }

    /// Uses an image the caller already opened (for example by the control socket's
    /// `blockdev-add`); `config.path` is reported, and a qcow2 image's relative backing file
    /// is found from there.
    pub fn with_file(config: BlockConfig, file: File) -> Result<Self, BlockError> {
        let disk = Disk::from_file_format(file, &config.path, config.readonly, config.format)
            .map_err(|source| BlockError::Open {
                id: config.id.clone(),
                path: config.path.clone(),
                source,
            })?;
        Self::with_disk(config, disk)
    }

    /// Uses an image the caller already opened and read ([`Disk::open_format`]), for example
    /// to check a user's images before anything else is built. `config.path` is reported and
    /// `config.format` says whether the format was given (`Some`) or probed (`None`); the
    /// disk's own read-only setting replaces `config.readonly`.
    pub fn with_disk(mut config: BlockConfig, disk: Disk) -> Result<Self, BlockError> {
        config.readonly = disk.readonly();
        let capacity = disk.capacity();
        if disk.probed_raw() {
            warn!(
                "virtio-blk {}: {} has no format given and probes as raw: the guest may not write an image header to its first sector (give format=raw to lift this)",
                config.id,
                config.path.display()
            );
        }
        Self::build(config, Some(disk), capacity)
    }

    fn build(config: BlockConfig, disk: Option<Disk>, capacity: u64) -> Result<Self, BlockError> {
        let invalid = |reason| BlockError::Config {
            id: config.id.clone(),
            reason,
        };
        if config.num_queues == 0 {
            return Err(invalid("at least one queue is needed"));
        }
        if !config.queue_size.is_power_of_two() || config.queue_size > MAX_QUEUE_SIZE {
            return Err(invalid("queue size must be a power of two up to 32768"));
        }
        let avail_features = Self::features_for(&config);
        let writable = !config.readonly;
        let config_space = ConfigSpace::new(&ConfigValues {
            capacity,
            seg_max: config.seg_max(),
            blk_size: BLOCK_SIZE,
            writeback: 1,
            num_queues: config.num_queues,
            max_discard_sectors: if writable { MAX_DISCARD_SECTORS } else { 0 },
            max_discard_seg: if writable { MAX_DISCARD_SEG } else { 0 },
            discard_sector_alignment: if writable {
                DISCARD_SECTOR_ALIGNMENT
            } else {
                0
            },
            max_write_zeroes_sectors: if writable {
                MAX_WRITE_ZEROES_SECTORS
            } else {
                0
            },
            max_write_zeroes_seg: if writable { MAX_WRITE_ZEROES_SEG } else { 0 },
            write_zeroes_may_unmap: u8::from(writable),
        });
        info!(
            "virtio-blk {}: {} ({}, {} sectors{})",
            config.id,
            config.path.display(),
            disk.as_ref().map_or(ImageFormat::Raw, Disk::format),
            capacity,
            if config.readonly { ", read-only" } else { "" }
        );
        let format = disk
            .as_ref()
            .map_or((config.format.unwrap_or_default(), false), |d| {
                (d.format(), config.format.is_none())
            });
        Ok(Block {
            format,
            disk: disk.map(Arc::new),
            avail_features,
            capacity,
            config_space,
            stats: Arc::new(BlockStats::default()),
            needs_reset: Arc::new(AtomicBool::new(false)),
            worker: None,
            parked: None,
            fails_on_notify: None,
            backend_errors: None,
            engines: EngineSource::Backend(config.aio),
            config,
        })
    }

    /// A device whose backend is already gone: a disk pulled out by surprise that goes on
    /// failing its driver's requests, restored from a snapshot (its image may no longer exist).
    /// It reports `capacity` sectors, as it did.
    pub fn without_backend(config: BlockConfig, capacity: u64) -> Result<Self, BlockError> {
        Self::build(config, None, capacity)
    }

    fn features_for(config: &BlockConfig) -> u64 {
        let mut bits = vec![
            VIRTIO_F_VERSION_1,
            VIRTIO_RING_F_EVENT_IDX,
            VIRTIO_RING_F_INDIRECT_DESC,
            VIRTIO_BLK_F_SEG_MAX,
            VIRTIO_BLK_F_BLK_SIZE,
            VIRTIO_BLK_F_FLUSH,
        ];
        if config.num_queues > 1 {
            bits.push(VIRTIO_BLK_F_MQ);
        }
        if config.readonly {
            bits.push(VIRTIO_BLK_F_RO);
        } else {
            bits.extend([VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_WRITE_ZEROES]);
        }
        bits.into_iter().fold(0, |acc, bit| acc | (1u64 << bit))
    }

    /// The configuration the device was built from.
    pub fn config(&self) -> &BlockConfig {
        &self.config
    }

    /// The image's format (for a device built without a backend: the configuration's, raw if
    /// it names none).
    pub fn format(&self) -> ImageFormat {
        self.format.0
    }

    /// Whether the format was probed ([`BlockConfig::format`] was `None`). A VMM that saves the
    /// device records this with [`format`](Self::format): a probed raw image is restored
    /// probed, with its first sector still guarded.
    pub fn format_probed(&self) -> bool {
        self.format.1
    }

    /// Capacity in 512-byte sectors, as the guest sees it (also once the backend is gone).
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Request counters, shared: keep the handle to read them after the device is boxed.
    pub fn stats(&self) -> Arc<BlockStats> {
        self.stats.clone()
    }

    /// Tells `observer` of every failure of the backing file's I/O from the next activation
    /// on.
    pub fn set_backend_error_observer(&mut self, observer: Option<Arc<dyn BackendErrorObserver>>) {
        self.backend_errors = observer;
    }

    /// Runs the queues' host I/O on engines `factory` makes, from the next activation on.
    #[cfg(test)]
    pub(crate) fn set_engine_factory(&mut self, factory: host_io::EngineFactory) {
        self.engines = EngineSource::Factory(factory);
    }

    /// Whether the device serves its queues: its I/O thread runs, or, pulled out, it fails
    /// requests on notify.
    pub fn is_active(&self) -> bool {
        self.worker.is_some() || self.fails_on_notify.is_some()
    }

    /// Whether the image is still open (false after [`Block::shutdown`]).
    pub fn has_backend(&self) -> bool {
        self.disk.is_some()
    }

    fn stop_worker(&mut self) {
        if let Some(at_switch) = self.fails_on_notify.take() {
            info!(
                "virtio-blk {}: pulled-out device reset; it failed {} request(s) submitted after the pull, on the vCPUs that notified",
                self.config.id,
                self.stats.snapshot().failed_on_removal - at_switch
            );
        }
        self.parked = None;
        if let Some(worker) = self.worker.take() {
            worker.stop();
        }
    }

    fn worker_name(&self) -> String {
        format!("blk-{}", self.config.id)
    }

    /// Starts the paused I/O thread again, if there is one (none while the device fails on
    /// notify: it looks at its queues once instead, for what came while it was paused).
    fn resume_worker(&mut self) -> Result<(), ActivateError> {
        if self.fails_on_notify.is_some() {
            for index in 0..self.config.num_queues {
                self.queue_notified(index);
            }
            return Ok(());
        }
        let Some(parked) = self.parked.take() else {
            return Ok(());
        };
        let worker =
            Worker::resume(self.worker_name(), parked).map_err(|e| ActivateError::Failed {
                id: self.config.id.clone(),
                reason: format!("cannot start I/O thread: {e}"),
            })?;
        self.worker = Some(worker);
        Ok(())
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn id(&self) -> &str {
        &self.config.id
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![self.config.queue_size; usize::from(self.config.num_queues)]
    }

    fn features(&self) -> u64 {
        self.avail_features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        self.config_space.read(offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Nothing is writable: VIRTIO_BLK_F_CONFIG_WCE is not offered.
        crate::guest_log::report(
            "virtio-blk config write",
            log::Level::Warn,
            format_args!(
                "virtio-blk {}: ignored config write of {} bytes at {offset:#x}",
                self.config.id,
                data.len()
            ),
        );
    }

    fn activate(
        &mut self,
        memory: GuestMemory,
        interrupt: Arc<dyn VirtioInterrupt>,
        features: u64,
        mut queues: Vec<ActiveQueue>,
    ) -> Result<(), ActivateError> {
        let id = self.config.id.clone();
        let fail = move |reason: String| ActivateError::Failed {
            id: id.clone(),
            reason,
        };
        self.stop_worker();
        let Some(disk) = self.disk.clone() else {
            return Err(fail("backend already released".into()));
        };
        if queues.is_empty() || queues.len() > usize::from(self.config.num_queues) {
            return Err(fail(format!("{} queues enabled", queues.len())));
        }
        let features = features & self.avail_features;
        let event_idx = features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        for q in &mut queues {
            q.queue.set_event_idx(event_idx);
        }
        self.needs_reset.store(false, Ordering::Release);
        let processor = RequestProcessor::new(
            disk,
            &self.config.id,
            features,
            self.config.seg_max(),
            self.stats.clone(),
        )
        .with_backend_error_observer(self.backend_errors.clone());
        let ctx = WorkerContext {
            failing: false,
            memory,
            interrupt,
            queues,
            processor,
            needs_reset: self.needs_reset.clone(),
            engines: self.engines.clone(),
        };
        let worker = Worker::spawn(self.worker_name(), ctx)
            .map_err(|e| fail(format!("cannot start I/O thread: {e}")))?;
        self.worker = Some(worker);
        Ok(())
    }

    fn reset(&mut self) {
        self.stop_worker();
        self.needs_reset.store(false, Ordering::Release);
    }

    fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::Acquire)
    }

    /// Stops the I/O thread (as [`VirtioDevice::reset`]) and closes the image, for hot-unplug
    /// (graceful or surprise): afterwards the device serves nothing, `activate` fails, and the
    /// backend file is released. Idempotent.
    fn shutdown(&mut self) {
        self.reset();
        if self.disk.take().is_some() {
            info!("virtio-blk {}: backend released", self.config.id);
        }
    }

    /// Pulls the device out: the I/O thread fails (`VIRTIO_BLK_S_IOERR`) or drops every request
    /// the driver made available, finishing the one it is serving first (see
    /// [`InFlightPolicy`]); if that host I/O outlasts a short wait, the thread finishes it
    /// alone, publishing nothing, and holds the backend until then. The backend is released.
    /// With [`InFlightPolicy::Fail`] the thread then goes on failing every request the driver
    /// makes available, without a backend, until [`reset`](VirtioDevice::reset)
    /// ([`InFlightOutcome::failing`]); otherwise the device is as after
    /// [`shutdown`](VirtioDevice::shutdown).
    fn surprise_remove(&mut self, in_flight: InFlightPolicy) -> InFlightOutcome {
        // Paused (the VM is): the thread takes the pull as a running one would, and no driver
        // runs to take the completions.
        let driver_runs = self.parked.is_none();
        if let Err(e) = self.resume_worker() {
            warn!("virtio-blk {}: {e}", self.config.id);
        }
        let before = self.stats.snapshot();
        let pulled = match self.worker.take() {
            Some(w) => w.pull(in_flight, driver_runs),
            None => Pulled::Ended,
        };
        self.needs_reset.store(false, Ordering::Release);
        let after = self.stats.snapshot();
        let outcome = InFlightOutcome {
            failed: after.failed_on_removal - before.failed_on_removal,
            dropped: after.dropped_on_removal - before.dropped_on_removal,
            host_io_pending: matches!(pulled, Pulled::HostIoPending),
            failing: matches!(pulled, Pulled::Failing(..)),
            collected: match pulled {
                Pulled::Failing(_, collected) => collected,
                _ => None,
            },
        };
        info!(
            "virtio-blk {}: pulled out ({} in-flight policy): {outcome:?}",
            self.config.id,
            in_flight.name(),
        );
        if self.disk.take().is_some() && !outcome.host_io_pending {
            info!("virtio-blk {}: backend released", self.config.id);
        }
        if let Pulled::Failing(worker, _) = pulled {
            self.worker = Some(worker);
        }
        outcome
    }

    /// The I/O thread, failing requests since a pull, hands its queues over: from now on a
    /// notification is answered on the thread that delivers it. A running thread is paused
    /// (it finishes nothing, all is failed); a parked context (the VM is paused, or was just
    /// restored) stays parked.
    fn fail_on_notify(&mut self) -> bool {
        if self.fails_on_notify.is_some() {
            return true;
        }
        if let Some(worker) = self.worker.take() {
            self.parked = worker.pause();
        }
        match &self.parked {
            Some(p) if p.ctx.failing => {
                self.fails_on_notify = Some(self.stats.snapshot().failed_on_removal);
                true
            }
            _ => false,
        }
    }

    fn queue_notified(&mut self, index: u16) -> bool {
        if self.fails_on_notify.is_none() {
            return false;
        }
        if let Some(parked) = self.parked.as_mut() {
            worker::fail_available(parked, index);
        }
        true
    }

    /// Also writes a qcow2 image's cached tables back: a paused machine may be saved, or
    /// handed to a destination that opens the image next (QEMU flushes every image when a VM
    /// stops, for the same reason).
    fn pause(&mut self) -> Vec<QueueProgress> {
        if let Some(worker) = self.worker.take() {
            self.parked = worker.pause();
        }
        if let Some(disk) = self.disk.as_ref().filter(|d| d.qcow2().is_some()) {
            if let Err(e) = disk.flush() {
                warn!(
                    "virtio-blk {}: cannot write the image's tables back: {e}",
                    self.config.id
                );
            }
        }
        self.parked.as_ref().map_or_else(Vec::new, |p| {
            p.ctx
                .queues
                .iter()
                .map(|q| QueueProgress {
                    index: q.index,
                    next_avail: q.queue.next_avail(),
                    next_used: q.queue.next_used(),
                })
                .collect()
        })
    }

    fn resume(&mut self) -> Result<(), ActivateError> {
        self.resume_worker()
    }

    fn restore_active(
        &mut self,
        memory: GuestMemory,
        interrupt: Arc<dyn VirtioInterrupt>,
        features: u64,
        mut queues: Vec<ActiveQueue>,
        (failing, needs_reset): (bool, bool),
    ) -> Result<(), ActivateError> {
        let id = self.config.id.clone();
        let fail = move |reason: String| ActivateError::Failed {
            id: id.clone(),
            reason,
        };
        self.stop_worker();
        if queues.is_empty() || queues.len() > usize::from(self.config.num_queues) {
            return Err(fail(format!("{} queues enabled", queues.len())));
        }
        let features = features & self.avail_features;
        let event_idx = features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        for q in &mut queues {
            q.queue.set_event_idx(event_idx);
        }
        let processor = match (failing, self.disk.clone()) {
            (true, _) => {
                // Pulled out: the backend is gone for good.
                self.disk = None;
                RequestProcessor::without_backend(
                    &self.config.id,
                    features,
                    self.config.seg_max(),
                    self.stats.clone(),
                )
            }
            (false, Some(disk)) => RequestProcessor::new(
                disk,
                &self.config.id,
                features,
                self.config.seg_max(),
                self.stats.clone(),
            )
            .with_backend_error_observer(self.backend_errors.clone()),
            (false, None) => return Err(fail("backend already released".into())),
        };
        self.needs_reset.store(needs_reset, Ordering::Release);
        let broken = vec![needs_reset; queues.len()];
        self.parked = Some(Parked {
            ctx: WorkerContext {
                failing,
                memory,
                interrupt,
                queues,
                processor,
                needs_reset: self.needs_reset.clone(),
                engines: self.engines.clone(),
            },
            broken,
        });
        Ok(())
    }
}

impl Block {
    /// See [`VirtioDevice::shutdown`] (also callable without the trait in scope).
    pub fn shutdown(&mut self) {
        VirtioDevice::shutdown(self);
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        self.stop_worker();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::GuestRam;
    use crate::virtio::QueueProgress;
    use std::time::Duration;
    use testing::*;
    use virtio_bindings::virtio_blk::VIRTIO_BLK_T_IN;
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::Queue;
    use vm_memory::{Bytes, GuestAddress, GuestAddressSpace};

    fn block(tmp: &vmm_sys_util::tempfile::TempFile, readonly: bool, num_queues: u16) -> Block {
        let mut config = BlockConfig::new(tmp.as_path(), "disk0");
        config.readonly = readonly;
        config.num_queues = num_queues;
        Block::new(config).unwrap()
    }

    const HDR: u64 = BUF;
    const DATA: u64 = BUF + 0x1000;
    const STATUS: u64 = BUF + 0x800;

    #[test]
    fn features_and_config_space() {
        let tmp = image();
        let dev = block(&tmp, false, 1);
        let f = dev.features();
        let has = |bit: u32| f & (1u64 << bit) != 0;
        assert_eq!(dev.device_type(), 2);
        assert!(has(VIRTIO_F_VERSION_1) && has(VIRTIO_RING_F_EVENT_IDX));
        assert!(has(VIRTIO_BLK_F_FLUSH) && has(VIRTIO_BLK_F_SEG_MAX) && has(VIRTIO_BLK_F_BLK_SIZE));
        assert!(has(VIRTIO_BLK_F_DISCARD) && has(VIRTIO_BLK_F_WRITE_ZEROES));
        assert!(!has(VIRTIO_BLK_F_RO) && !has(VIRTIO_BLK_F_MQ));
        assert_eq!(dev.queue_max_sizes(), vec![256]);
        let mut cap = [0u8; 8];
        dev.read_config(0, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), IMAGE_SECTORS);
        let mut seg_max = [0u8; 4];
        dev.read_config(12, &mut seg_max);
        assert_eq!(u32::from_le_bytes(seg_max), 254);

        let dev = block(&tmp, true, 4);
        let f = dev.features();
        let has = |bit: u32| f & (1u64 << bit) != 0;
        assert!(has(VIRTIO_BLK_F_RO) && has(VIRTIO_BLK_F_MQ));
        assert!(!has(VIRTIO_BLK_F_DISCARD) && !has(VIRTIO_BLK_F_WRITE_ZEROES));
        assert_eq!(dev.queue_max_sizes(), vec![256; 4]);
        let mut nq = [0u8; 2];
        dev.read_config(34, &mut nq);
        assert_eq!(u16::from_le_bytes(nq), 4);
        let mut max_discard = [0xffu8; 4];
        dev.read_config(36, &mut max_discard);
        assert_eq!(max_discard, [0; 4]);
    }

    #[test]
    fn bad_configurations_are_refused() {
        let tmp = image();
        let mut c = BlockConfig::new(tmp.as_path(), "d");
        c.num_queues = 0;
        assert!(matches!(Block::new(c), Err(BlockError::Config { .. })));
        for qs in [0, 3, 100] {
            let mut c = BlockConfig::new(tmp.as_path(), "d");
            c.queue_size = qs;
            assert!(
                matches!(Block::new(c), Err(BlockError::Config { .. })),
                "{qs}"
            );
        }
        let c = BlockConfig::new("/nonexistent/disk.img", "d");
        assert!(matches!(Block::new(c), Err(BlockError::Open { .. })));
    }

    #[test]
    fn serves_queue_until_reset_then_again() {
        let tmp = image();
        let rig = Rig::new();
        let guard = rig.memory.memory();
        let mem: &GuestRam = &guard;
        let q = MockSplitQueue::new(mem, 16);
        let mut dev = block(&tmp, false, 1);

        put_header(mem, HDR, VIRTIO_BLK_T_IN, 1);
        let d = [
            desc_next(HDR, 16, N, 1),
            desc_next(DATA, 512, W | N, 2),
            desc_next(STATUS, 1, W, 0),
        ];
        q.add_desc_chains(&d, 0).unwrap();
        rig.activate(&mut dev, q.create_queue().unwrap()).unwrap();
        assert!(dev.is_active());
        // Served without a notification: the thread looks at the queue when it starts.
        wait_for("first request", || q.used().idx().load() == 1);
        assert_eq!(status(mem, STATUS), 0);
        assert_eq!(q.used().ring().ref_at(0).unwrap().load().len(), 513);
        wait_for("interrupt", || {
            rig.interrupt.queue.load(Ordering::SeqCst) == 1
        });

        // A second request, announced by a notification.
        put_header(mem, HDR + 0x100, VIRTIO_BLK_T_IN, 2);
        let d = [
            desc_next(HDR + 0x100, 16, N, 4),
            desc_next(DATA, 512, W | N, 5),
            desc_next(STATUS, 1, W, 0),
        ];
        q.add_desc_chains(&d, 3).unwrap();
        rig.notify.write(1).unwrap();
        wait_for("second request", || q.used().idx().load() == 2);

        // After reset returns the device is inert.
        dev.reset();
        assert!(!dev.is_active());
        q.add_desc_chains(&d, 3).unwrap();
        rig.notify.write(1).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(q.used().idx().load(), 2);

        // The driver re-initialises the device: it serves again, from the same image.
        let mut queue: Queue = q.create_queue().unwrap();
        queue.set_next_avail(2);
        queue.set_next_used(2);
        rig.activate(&mut dev, queue).unwrap();
        wait_for("request after re-activation", || q.used().idx().load() == 3);
        assert_eq!(dev.stats().snapshot().reads, 3);
    }

    /// An active device that served one read request and then had two more published but not
    /// notified: (device, queue).
    /// One more read after `two_requests_in_flight`'s, its header at `HDR + 0x90` and its
    /// status byte at `STATUS + 3` (set to 0xee, so that its completion shows). Returns its
    /// descriptors, to publish at table index 9 (they chain to 10 and 11).
    fn late_request(mem: &GuestRam) -> [virtio_queue::desc::RawDescriptor; 3] {
        put_header(mem, HDR + 0x90, VIRTIO_BLK_T_IN, 1);
        mem.write_obj(0xeeu8, GuestAddress(STATUS + 3)).unwrap();
        [
            desc_next(HDR + 0x90, 16, N, 10),
            desc_next(DATA, 512, W | N, 11),
            desc_next(STATUS + 3, 1, W, 0),
        ]
    }

    fn two_requests_in_flight<'a>(
        tmp: &vmm_sys_util::tempfile::TempFile,
        rig: &Rig,
        mem: &'a GuestRam,
    ) -> (Block, MockSplitQueue<'a, GuestRam>) {
        let q = MockSplitQueue::new(mem, 16);
        let mut dev = block(tmp, false, 1);
        let chain = |i: u16, status: u64| {
            put_header(mem, HDR + u64::from(i) * 0x10, VIRTIO_BLK_T_IN, 1);
            [
                desc_next(HDR + u64::from(i) * 0x10, 16, N, i + 1),
                desc_next(DATA, 512, W | N, i + 2),
                desc_next(status, 1, W, 0),
            ]
        };
        q.add_desc_chains(&chain(0, STATUS + 2), 0).unwrap();
        rig.activate(&mut dev, q.create_queue().unwrap()).unwrap();
        // Once its interrupt is out the I/O thread polls the queue for 50 µs (`worker::POLL`)
        // and then sleeps until notified. Chains added while it still polls would be taken
        // and served: give it well over its polling time first. (A thread descheduled in
        // the middle of its poll for longer than this still takes them.)
        wait_for("first request", || {
            rig.interrupt.queue.load(Ordering::SeqCst) == 1
        });
        std::thread::sleep(std::time::Duration::from_millis(20));
        for (i, status) in [(3u16, STATUS), (6, STATUS + 1)] {
            q.add_desc_chains(&chain(i, status), i).unwrap();
        }
        mem.write_slice(&[0xee, 0xee], GuestAddress(STATUS))
            .unwrap();
        (dev, q)
    }

    /// Pulled out and failing on notify: a request the driver submits is failed, and its
    /// interrupt raised, before `queue_notified` returns, on the caller's thread (the vCPU
    /// that notified); one made available while the VM was paused is failed on resume; the
    /// driver's reset ends it.
    #[test]
    fn a_pulled_device_fails_on_notify_before_the_notification_returns() {
        let tmp = image();
        let rig = Rig::new();
        let guard = rig.memory.memory();
        let mem: &GuestRam = &guard;
        let (mut dev, q) = two_requests_in_flight(&tmp, &rig, mem);
        assert!(!dev.queue_notified(0), "served by its I/O thread");
        let outcome = dev.surprise_remove(InFlightPolicy::Fail);
        assert_eq!((outcome.failed, outcome.failing), (2, true));
        assert!(dev.fail_on_notify());
        assert!(dev.is_active());
        assert!(!dev.has_backend());
        let used_event = GuestAddress(q.avail_addr().0 + 4 + 2 * 16);
        mem.write_obj(3u16, used_event).unwrap();
        let late = late_request(mem);
        q.add_desc_chains(&late, 9).unwrap();
        // No I/O thread: nothing happens until the notification.
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(q.used().idx().load(), 3);
        assert!(dev.queue_notified(0));
        assert_eq!(q.used().idx().load(), 4);
        assert_eq!(status(mem, STATUS + 3), 1);
        assert_eq!(rig.interrupt.queue.load(Ordering::SeqCst), 3);

        // Paused (the VM is): a chain made available then is failed on resume.
        assert_eq!(dev.pause().len(), 1);
        mem.write_obj(4u16, used_event).unwrap();
        mem.write_obj(0xeeu8, GuestAddress(STATUS + 3)).unwrap();
        q.add_desc_chains(&late, 12).unwrap();
        dev.resume().unwrap();
        assert_eq!(q.used().idx().load(), 5);
        assert_eq!(status(mem, STATUS + 3), 1);
        assert_eq!(rig.interrupt.queue.load(Ordering::SeqCst), 4);
        assert_eq!(dev.stats().snapshot().failed_on_removal, 4);

        // The driver's reset ends it.
        dev.reset();
        assert!(!dev.is_active());
        assert!(!dev.queue_notified(0));
        q.add_desc_chains(&late, 9).unwrap();
        assert_eq!(q.used().idx().load(), 5);
    }

    #[test]
    fn surprise_removal_fails_the_requests_in_flight() {
        let tmp = image();
        let rig = Rig::new();
        let guard = rig.memory.memory();
        let mem: &GuestRam = &guard;
        let (mut dev, q) = two_requests_in_flight(&tmp, &rig, mem);
        let outcome = dev.surprise_remove(InFlightPolicy::Fail);
        assert_eq!(
            outcome,
            InFlightOutcome {
                failed: 2,
                dropped: 0,
                host_io_pending: false,
                failing: true,
                // The test takes nothing until later.
                collected: Some(false),
            }
        );
        // Completed with VIRTIO_BLK_S_IOERR (1), used length 1, the driver interrupted.
        assert_eq!(q.used().idx().load(), 3);
        assert_eq!(status(mem, STATUS), 1);
        assert_eq!(status(mem, STATUS + 1), 1);
        assert_eq!(q.used().ring().ref_at(1).unwrap().load().len(), 1);
        assert_eq!(q.used().ring().ref_at(2).unwrap().load().len(), 1);
        assert_eq!(rig.interrupt.queue.load(Ordering::SeqCst), 2);
        assert_eq!(dev.stats().snapshot().reads, 1, "only the first was read");
        assert!(!dev.has_backend());

        // The driver, not knowing yet, submits another request: failed too, interrupt sent.
        let late = late_request(mem);
        q.add_desc_chains(&late, 9).unwrap();
        // used_event (VIRTIO_RING_F_EVENT_IDX): interrupt once the used index passes 3.
        let used_event = GuestAddress(q.avail_addr().0 + 4 + 2 * 16);
        mem.write_obj(3u16, used_event).unwrap();
        rig.notify.write(1).unwrap();
        wait_for("the late request failed", || q.used().idx().load() == 4);
        assert_eq!(status(mem, STATUS + 3), 1);
        assert_eq!(rig.interrupt.queue.load(Ordering::SeqCst), 3);
        let stats = dev.stats().snapshot();
        assert_eq!((stats.reads, stats.failed_on_removal), (1, 3));

        // The driver's reset ends it: nothing more is published.
        dev.reset();
        assert!(!dev.is_active());
        q.add_desc_chains(&late, 12).unwrap();
        rig.notify.write(1).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(q.used().idx().load(), 4);
        assert!(rig.activate(&mut dev, q.create_queue().unwrap()).is_err());
    }

    #[test]
    fn surprise_removal_drops_the_requests_in_flight() {
        let tmp = image();
        let rig = Rig::new();
        let guard = rig.memory.memory();
        let mem: &GuestRam = &guard;
        let (mut dev, q) = two_requests_in_flight(&tmp, &rig, mem);
        let outcome = dev.surprise_remove(InFlightPolicy::Drop);
        assert_eq!((outcome.failed, outcome.dropped), (0, 2));
        // Nothing more published: no used entry, no status, no interrupt.
        assert_eq!(q.used().idx().load(), 1);
        assert_eq!(status(mem, STATUS), 0xee);
        assert_eq!(rig.interrupt.queue.load(Ordering::SeqCst), 1);
        assert!(!dev.is_active() && !dev.has_backend());
        // A device that was never activated has nothing in flight.
        let mut idle = block(&tmp, false, 1);
        assert_eq!(
            idle.surprise_remove(InFlightPolicy::Fail),
            InFlightOutcome::default()
        );
    }

    #[test]
    fn corrupt_avail_index_sets_needs_reset() {
        let tmp = image();
        let rig = Rig::new();
        let guard = rig.memory.memory();
        let mem: &GuestRam = &guard;
        let q = MockSplitQueue::new(mem, 16);
        let mut dev = block(&tmp, false, 1);
        rig.activate(&mut dev, q.create_queue().unwrap()).unwrap();
        assert!(!dev.needs_reset());
        q.avail().idx().store(100);
        rig.notify.write(1).unwrap();
        wait_for("needs reset", || dev.needs_reset());
        wait_for("config interrupt", || {
            rig.interrupt.config.load(Ordering::SeqCst) == 1
        });
        assert_eq!(q.used().idx().load(), 0);
        dev.reset();
        assert!(!dev.needs_reset());
    }

    #[test]
    fn head_index_out_of_range_sets_needs_reset() {
        let tmp = image();
        let rig = Rig::new();
        let guard = rig.memory.memory();
        let mem: &GuestRam = &guard;
        let q = MockSplitQueue::new(mem, 16);
        let mut dev = block(&tmp, false, 1);
        q.avail().ring().ref_at(0).unwrap().store(200);
        q.avail().idx().store(1);
        rig.activate(&mut dev, q.create_queue().unwrap()).unwrap();
        wait_for("needs reset", || dev.needs_reset());
        assert_eq!(q.used().idx().load(), 0);
    }

    #[test]
    fn shutdown_releases_the_backend() {
        let tmp = image();
        let rig = Rig::new();
        let guard = rig.memory.memory();
        let q = MockSplitQueue::new(&*guard, 16);
        let mut dev = block(&tmp, false, 1);
        rig.activate(&mut dev, q.create_queue().unwrap()).unwrap();
        dev.shutdown();
        assert!(!dev.is_active() && !dev.has_backend());
        assert!(rig.activate(&mut dev, q.create_queue().unwrap()).is_err());
        dev.shutdown();
        // Reads of the configuration still work (the transport may be asked before removal).
        let mut cap = [0u8; 8];
        dev.read_config(0, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), IMAGE_SECTORS);
    }

    #[test]
    fn activate_refuses_no_queues_and_too_many() {
        let tmp = image();
        let rig = Rig::new();
        let mut dev = block(&tmp, false, 1);
        let err = dev.activate(
            rig.memory.clone(),
            rig.interrupt.clone(),
            dev.features(),
            vec![],
        );
        assert!(err.is_err());
        let guard = rig.memory.memory();
        let q = MockSplitQueue::new(&*guard, 16);
        let two = (0..2)
            .map(|i| ActiveQueue {
                index: i,
                queue: q.create_queue().unwrap(),
                notify: rig.notify.clone(),
            })
            .collect();
        assert!(dev
            .activate(
                rig.memory.clone(),
                rig.interrupt.clone(),
                dev.features(),
                two
            )
            .is_err());
    }

    #[test]
    fn with_file_uses_an_open_image() {
        let tmp = image();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .open(tmp.as_path())
            .unwrap();
        let mut c = BlockConfig::new(tmp.as_path(), "d");
        c.readonly = true;
        let dev = Block::with_file(c, file).unwrap();
        assert_eq!(dev.capacity(), IMAGE_SECTORS);
    }

    /// The chain `two_requests_in_flight` left available, served on another device restored
    /// from the first one's saved progress: each exactly once, in order, on the same image.
    #[test]
    fn paused_device_resumes_on_another_where_it_stopped() {
        let tmp = image();
        let rig = Rig::new();
        let guard = rig.memory.memory();
        let mem: &GuestRam = &guard;
        let (mut dev, q) = two_requests_in_flight(&tmp, &rig, mem);
        let progress = dev.pause();
        assert_eq!(
            progress,
            vec![QueueProgress {
                index: 0,
                next_avail: 1,
                next_used: 1
            }]
        );
        assert!(!dev.is_active());
        assert_eq!(dev.pause(), progress, "pausing again changes nothing");
        // Paused: a notification is not served.
        rig.notify.write(1).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(q.used().idx().load(), 1);

        // The destination: a new device on the same image, its queue where the first stopped.
        let mut restored = block(&tmp, false, 1);
        let at = (progress[0].next_avail, progress[0].next_used);
        rig.restore(&mut restored, &q, at, false);
        wait_for("both requests served", || q.used().idx().load() == 3);
        assert_eq!(status(mem, STATUS), 0);
        assert_eq!(status(mem, STATUS + 1), 0);
        assert_eq!(restored.stats().snapshot().reads, 2);
        assert_eq!(
            dev.stats().snapshot().reads,
            1,
            "the first device served one"
        );
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(q.used().idx().load(), 3, "nothing served twice");
        drop(dev);

        // Paused and resumed in place, the device goes on serving.
        restored.pause();
        restored.resume().unwrap();
        q.add_desc_chains(&late_request(mem), 9).unwrap();
        rig.notify.write(1).unwrap();
        wait_for("request after resume", || q.used().idx().load() == 4);
    }

    /// A device pulled out with `fail` whose driver had not reset it, restored without its
    /// backend: it fails what is available, and goes on failing until the reset.
    #[test]
    fn pulled_device_restored_goes_on_failing() {
        let tmp = image();
        let rig = Rig::new();
        let guard = rig.memory.memory();
        let mem: &GuestRam = &guard;
        let (_, q) = two_requests_in_flight(&tmp, &rig, mem);
        let mut config = BlockConfig::new("/gone/disk.img", "disk0");
        config.num_queues = 1;
        let mut restored = Block::without_backend(config, IMAGE_SECTORS).unwrap();
        let mut cap = [0u8; 8];
        restored.read_config(0, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), IMAGE_SECTORS);
        assert!(!restored.has_backend());
        rig.restore(&mut restored, &q, (1, 1), true);
        wait_for("both requests failed", || q.used().idx().load() == 3);
        assert_eq!(status(mem, STATUS), 1);
        assert_eq!(status(mem, STATUS + 1), 1);
        let stats = restored.stats().snapshot();
        assert_eq!((stats.reads, stats.failed_on_removal), (0, 2));
        // Paused and resumed, still failing.
        restored.pause();
        restored.resume().unwrap();
        q.add_desc_chains(&late_request(mem), 9).unwrap();
        rig.notify.write(1).unwrap();
        wait_for("late request failed", || q.used().idx().load() == 4);
        assert_eq!(status(mem, STATUS + 3), 1);
        restored.reset();
        assert!(!restored.is_active());
    }

    #[test]
    fn a_surprise_removal_while_paused_fails_what_is_available() {
        let tmp = image();
        let rig = Rig::new();
        let guard = rig.memory.memory();
        let mem: &GuestRam = &guard;
        let (mut dev, q) = two_requests_in_flight(&tmp, &rig, mem);
        dev.pause();
        let outcome = dev.surprise_remove(InFlightPolicy::Fail);
        assert_eq!((outcome.failed, outcome.failing), (2, true));
        assert_eq!(q.used().idx().load(), 3);
        assert!(!dev.has_backend());
    }
}
