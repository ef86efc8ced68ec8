//! Request counters of one virtio-blk device, cheap enough to update on every request.

use std::sync::atomic::{AtomicU64, Ordering};

/// Live counters, shared between the device's I/O thread and whoever reports them (the VMM's
/// control socket, tests). Every field only grows; all updates are relaxed atomics.
#[derive(Debug, Default)]
pub struct BlockStats {
    reads: AtomicU64,
    writes: AtomicU64,
    flushes: AtomicU64,
    get_ids: AtomicU64,
    discards: AtomicU64,
    write_zeroes: AtomicU64,
    unsupported: AtomicU64,
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    io_errors: AtomicU64,
    malformed_chains: AtomicU64,
    failed_on_removal: AtomicU64,
    dropped_on_removal: AtomicU64,
    backend_errors: AtomicU64,
}

/// A copy of [`BlockStats`] at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockStatsSnapshot {
    /// `VIRTIO_BLK_T_IN` requests seen.
    pub reads: u64,
    /// `VIRTIO_BLK_T_OUT` requests seen.
    pub writes: u64,
    /// `VIRTIO_BLK_T_FLUSH` requests seen.
    pub flushes: u64,
    /// `VIRTIO_BLK_T_GET_ID` requests seen.
    pub get_ids: u64,
    /// `VIRTIO_BLK_T_DISCARD` requests seen.
    pub discards: u64,
    /// `VIRTIO_BLK_T_WRITE_ZEROES` requests seen.
    pub write_zeroes: u64,
    /// Requests of an unknown type, or with flags the device does not support
    /// (completed with `VIRTIO_BLK_S_UNSUPP`).
    pub unsupported: u64,
    /// Bytes copied from the disk into guest memory.
    pub bytes_read: u64,
    /// Bytes copied from guest memory to the disk.
    pub bytes_written: u64,
    /// Requests completed with `VIRTIO_BLK_S_IOERR` (bad request or host I/O failure).
    pub io_errors: u64,
    /// Chains returned without a status byte (no usable device-writable status byte).
    pub malformed_chains: u64,
    /// Requests in flight when the device was pulled out with
    /// [`InFlightPolicy::Fail`](crate::virtio::InFlightPolicy::Fail): completed with
    /// `VIRTIO_BLK_S_IOERR` without being done (also counted in `io_errors`).
    pub failed_on_removal: u64,
    /// Requests in flight when the device was pulled out with
    /// [`InFlightPolicy::Drop`](crate::virtio::InFlightPolicy::Drop): never completed.
    pub dropped_on_removal: u64,
    /// Host I/O failures of the backing file (also counted in `io_errors`).
    pub backend_errors: u64,
}

/// Which counter to bump (keeps the call sites short).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Counter {
    Reads,
    Writes,
    Flushes,
    GetIds,
    Discards,
    WriteZeroes,
    Unsupported,
    BytesRead,
    BytesWritten,
    IoErrors,
    MalformedChains,
    FailedOnRemoval,
    DroppedOnRemoval,
    BackendErrors,
}

impl BlockStats {
    fn counter(&self, counter: Counter) -> &AtomicU64 {
        match counter {
            Counter::Reads => &self.reads,
            Counter::Writes => &self.writes,
            Counter::Flushes => &self.flushes,
            Counter::GetIds => &self.get_ids,
            Counter::Discards => &self.discards,
            Counter::WriteZeroes => &self.write_zeroes,
            Counter::Unsupported => &self.unsupported,
            Counter::BytesRead => &self.bytes_read,
            Counter::BytesWritten => &self.bytes_written,
            Counter::IoErrors => &self.io_errors,
            Counter::MalformedChains => &self.malformed_chains,
            Counter::FailedOnRemoval => &self.failed_on_removal,
            Counter::DroppedOnRemoval => &self.dropped_on_removal,
            Counter::BackendErrors => &self.backend_errors,
        }
    }

    pub(crate) fn add(&self, counter: Counter, n: u64) {
        self.counter(counter).fetch_add(n, Ordering::Relaxed);
    }

    /// Reads every counter.
    pub fn snapshot(&self) -> BlockStatsSnapshot {
        let get = |c| self.counter(c).load(Ordering::Relaxed);
        BlockStatsSnapshot {
            reads: get(Counter::Reads),
            writes: get(Counter::Writes),
            flushes: get(Counter::Flushes),
            get_ids: get(Counter::GetIds),
            discards: get(Counter::Discards),
            write_zeroes: get(Counter::WriteZeroes),
            unsupported: get(Counter::Unsupported),
            bytes_read: get(Counter::BytesRead),
            bytes_written: get(Counter::BytesWritten),
            io_errors: get(Counter::IoErrors),
            malformed_chains: get(Counter::MalformedChains),
            failed_on_removal: get(Counter::FailedOnRemoval),
            dropped_on_removal: get(Counter::DroppedOnRemoval),
            backend_errors: get(Counter::BackendErrors),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_accumulate() {
        let stats = BlockStats::default();
        stats.add(Counter::Reads, 1);
        stats.add(Counter::Reads, 1);
        stats.add(Counter::BytesRead, 4096);
        let snap = stats.snapshot();
        assert_eq!(snap.reads, 2);
        assert_eq!(snap.bytes_read, 4096);
        assert_eq!(snap.writes, 0);
    }
}
