//! Serving one virtio-blk request: parse the chain, do the I/O, write the status byte
//! (Virtio 1.2 §5.2.6).

use std::os::unix::io::AsRawFd;
use std::sync::Arc;

use log::debug;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::DescriptorChain;
use vm_memory::bitmap::Bitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::disk::{Disk, SECTOR_SIZE};
use super::host_io::{run_blocking, DiscardRange, HostResult, IoVec};
use super::image_format::HEADER_PROBE_BYTES;
use super::in_flight::{IoKind, Slot};
use super::request::{read_data, write_data, ChainLayout, RequestType, Segment};
use super::stats::{BlockStats, Counter};
use super::{
    BackendErrorObserver, MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, MAX_WRITE_ZEROES_SECTORS,
    MAX_WRITE_ZEROES_SEG,
};
use crate::virtio::GuestRam;

/// Size of one `struct virtio_blk_discard_write_zeroes` (§5.2.6): `le64 sector;
/// le32 num_sectors; le32 flags`.
const DISCARD_WRITE_ZEROES_SEGMENT_SIZE: u64 = 16;

const S_OK: u8 = VIRTIO_BLK_S_OK as u8;
const S_IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
const S_UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

/// What becomes of a request whose host I/O has finished.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Completion {
    /// Its status and used length are written as the I/O went.
    Publish,
    /// It fails with `VIRTIO_BLK_S_IOERR` whatever the I/O did: the device was pulled out
    /// meanwhile ([`InFlightPolicy::Fail`](crate::virtio::InFlightPolicy::Fail)).
    Fail,
    /// Nothing more is written for it: the device was reset, or pulled out with
    /// [`InFlightPolicy::Drop`](crate::virtio::InFlightPolicy::Drop).
    Discard,
}

/// Outcome of a request: bytes written to device-writable data buffers, or a non-OK status.
type Outcome = Result<u32, u8>;

/// What [`RequestProcessor::start`] made of a chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Started {
    /// Done without host I/O (or refused): its status is written; this is its used length.
    Complete(u32),
    /// Its host operation is in the slot, to be run and then
    /// [`finish`](RequestProcessor::finish)ed.
    HostIo,
}

/// What a parsed request needs.
enum Plan {
    /// A host operation of this kind, laid out in the slot.
    Host(IoKind),
    /// Nothing more: done, with this many bytes written to the driver's buffers.
    Done(u32),
}

/// Serves requests of one device against its disk: takes a chain apart into the host operation
/// it needs, and writes the outcome once that operation is done; the device's I/O thread runs
/// the operations in between, many at once ([`process`](Self::process) does all three in a
/// row).
/// Holds the scratch space for parsing, so one processor per I/O thread; nothing is allocated
/// per request.
#[derive(Debug)]
pub struct RequestProcessor {
    /// `None` once the device was pulled out (see [`release_backend`](Self::release_backend)).
    disk: Option<Arc<Disk>>,
    serial: [u8; VIRTIO_BLK_ID_BYTES as usize],
    features: u64,
    layout: ChainLayout,
    stats: Arc<BlockStats>,
    backend_errors: Option<Arc<dyn BackendErrorObserver>>,
    /// The slot of requests served synchronously ([`process`](Self::process)).
    scratch: Slot,
}

impl RequestProcessor {
    /// A processor for `disk`. `serial` is returned by GET_ID (truncated to
    /// `VIRTIO_BLK_ID_BYTES`, zero-padded); `features` are the negotiated feature bits (DISCARD
    /// and WRITE_ZEROES requests are refused unless negotiated); `seg_max` bounds the data
    /// segments of a request.
    pub fn new(
        disk: Arc<Disk>,
        serial: &str,
        features: u64,
        seg_max: u32,
        stats: Arc<BlockStats>,
    ) -> Self {
        RequestProcessor {
            disk: Some(disk),
            ..Self::without_backend(serial, features, seg_max, stats)
        }
    }

    /// A processor whose backend is already gone (a device pulled out by surprise, restored
    /// from a snapshot): it can only [`fail`](Self::fail) requests; any it is asked to process
    /// completes with an I/O error.
    pub fn without_backend(
        serial: &str,
        features: u64,
        seg_max: u32,
        stats: Arc<BlockStats>,
    ) -> Self {
        let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
        let n = serial.len().min(id.len());
        id[..n].copy_from_slice(&serial.as_bytes()[..n]);
        RequestProcessor {
            disk: None,
            serial: id,
            features,
            layout: ChainLayout::new(seg_max as usize),
            stats,
            backend_errors: None,
            scratch: Slot::default(),
        }
    }

    /// Tells `observer` of every failure of the backing file's I/O (not of the requests the
    /// guest got wrong).
    pub fn with_backend_error_observer(
        mut self,
        observer: Option<Arc<dyn BackendErrorObserver>>,
    ) -> Self {
        self.backend_errors = observer;
        self
    }

    /// Serves the request in `chain` synchronously and returns the used length to report for
    /// it: bytes written to device-writable buffers, status byte included; 0 when the chain has
    /// no usable status byte (then nothing at all was written). On a failed request the used
    /// length counts the status byte only.
    pub fn process(&mut self, chain: DescriptorChain<&GuestRam>) -> u32 {
        self.process_then(chain, || Completion::Publish)
            .unwrap_or(0)
    }

    /// [`process`](Self::process), asking `then` once the host I/O is done what becomes of
    /// the request, since the device may have been pulled out or reset meanwhile: `None` when
    /// it is to be discarded (no status byte written).
    pub fn process_then(
        &mut self,
        chain: DescriptorChain<&GuestRam>,
        then: impl FnOnce() -> Completion,
    ) -> Option<u32> {
        let mem: &GuestRam = chain.memory();
        let mut slot = std::mem::take(&mut self.scratch);
        slot.clear();
        let used = match self.start(chain.clone(), &mut slot) {
            Started::Complete(used) => Some(used),
            Started::HostIo => {
                // SAFETY: the slot's iovecs point into `mem`, which the chain borrows for the
                // whole call; the slot is ours alone.
                let result = unsafe {
                    match self.disk.as_ref().and_then(|d| d.qcow2()) {
                        Some(qcow2) => qcow2.run(slot.op()),
                        None => run_blocking(slot.op()),
                    }
                };
                let result = result.inspect(|&n| {
                    slot.transferred(n);
                });
                self.finish(mem, &slot, result, then())
            }
        };
        self.scratch = slot;
        used
    }

    /// Takes the request in `chain` apart into `slot` (cleared by the caller). A request that
    /// needs no host operation — GET_ID, a raw image's DISCARD and WRITE_ZEROES, a flush of a
    /// read-only disk, a refused or malformed one — is done here, its status written:
    /// [`Started::Complete`] with its used length. Otherwise the slot holds the host operation
    /// ([`Slot::op`]): [`Started::HostIo`].
    pub(super) fn start(&mut self, chain: DescriptorChain<&GuestRam>, slot: &mut Slot) -> Started {
        let mem: &GuestRam = chain.memory();
        slot.head = chain.head_index();
        self.layout.parse(chain.clone());
        let Some(status_addr) = self.layout.status() else {
            debug!(
                "virtio-blk: chain {} without status byte: {:?}",
                slot.head,
                self.layout.chain_fault()
            );
            self.stats.add(Counter::MalformedChains, 1);
            return Started::Complete(0);
        };
        slot.status = status_addr;
        match self.prepare(mem, slot) {
            Ok(Plan::Host(kind)) => {
                slot.kind = kind;
                Started::HostIo
            }
            Ok(Plan::Done(written)) => {
                Started::Complete(self.complete(mem, status_addr, S_OK, written))
            }
            Err(status) => Started::Complete(self.complete(mem, status_addr, status, 0)),
        }
    }

    /// The host operation of `slot` ended with `result` (the slot's [`Slot::transferred`]
    /// already told): writes the request's status as `completion` says and returns its used
    /// length, or `None` for [`Completion::Discard`] (nothing written).
    pub(super) fn finish(
        &mut self,
        mem: &GuestRam,
        slot: &Slot,
        result: HostResult,
        completion: Completion,
    ) -> Option<u32> {
        let result = match result {
            Ok(_) if slot.short_by() > 0 => Err(libc::EIO),
            other => other,
        };
        let (status, written) = match result {
            Ok(_) => match slot.kind {
                IoKind::Read => {
                    mark_dirty(mem, &slot.segments);
                    self.stats.add(Counter::BytesRead, u64::from(slot.len));
                    (S_OK, slot.len)
                }
                IoKind::Write => {
                    self.stats.add(Counter::BytesWritten, u64::from(slot.len));
                    (S_OK, 0)
                }
                IoKind::Flush | IoKind::Discard | IoKind::WriteZeroes => (S_OK, 0),
            },
            Err(errno) => (
                self.host_error(slot.kind.name(), std::io::Error::from_raw_os_error(errno)),
                0,
            ),
        };
        match completion {
            Completion::Publish => Some(self.complete(mem, slot.status, status, written)),
            Completion::Fail => Some(self.fail_started(mem, slot)),
            Completion::Discard => None,
        }
    }

    /// Completes a started request with `VIRTIO_BLK_S_IOERR` whatever its host operation did
    /// or would have done: the device was pulled out
    /// ([`InFlightPolicy::Fail`](crate::virtio::InFlightPolicy::Fail)). Returns its used
    /// length.
    pub(super) fn fail_started(&mut self, mem: &GuestRam, slot: &Slot) -> u32 {
        self.stats.add(Counter::FailedOnRemoval, 1);
        self.complete(mem, slot.status, S_IOERR, 0)
    }

    /// Completes the request in `chain` with `VIRTIO_BLK_S_IOERR` without doing it: the device
    /// is being pulled out ([`InFlightPolicy::Fail`](crate::virtio::InFlightPolicy::Fail)).
    /// Returns the used length as [`process`](Self::process) does.
    pub fn fail(&mut self, chain: DescriptorChain<&GuestRam>) -> u32 {
        let mem: &GuestRam = chain.memory();
        self.layout.parse(chain.clone());
        let Some(status_addr) = self.layout.status() else {
            self.stats.add(Counter::MalformedChains, 1);
            return 0;
        };
        self.stats.add(Counter::FailedOnRemoval, 1);
        self.complete(mem, status_addr, S_IOERR, 0)
    }

    /// A host I/O of the request failed: the request fails with `VIRTIO_BLK_S_IOERR`. Unless the
    /// guest's buffers were the problem (EFAULT: outside guest memory), the backend is failing:
    /// counted and reported to the observer.
    fn host_error(&self, what: &str, e: std::io::Error) -> u8 {
        debug!("virtio-blk: {what} failed: {e}");
        if e.raw_os_error() != Some(libc::EFAULT) {
            self.stats.add(Counter::BackendErrors, 1);
            if let Some(observer) = &self.backend_errors {
                observer.backend_error(what, &e);
            }
        }
        S_IOERR
    }

    /// Lets go of the backing file (the device was pulled out and serves nothing more): every
    /// request [`process`](Self::process)ed from now on fails with `VIRTIO_BLK_S_IOERR`;
    /// [`fail`](Self::fail) works as before. The file is closed once no one else holds it.
    pub fn release_backend(&mut self) {
        self.disk = None;
    }

    /// Whether the backing file's I/O may block the thread that submits it
    /// ([`Disk::submission_may_block`]).
    pub fn submission_may_block(&self) -> bool {
        self.disk.as_ref().is_some_and(|d| d.submission_may_block())
    }

    /// The image, until it is released.
    pub(super) fn image(&self) -> Option<&Disk> {
        self.disk.as_deref()
    }

    /// Requests failed because the device was pulled out, so far.
    pub fn failed_on_removal(&self) -> u64 {
        self.stats.snapshot().failed_on_removal
    }

    /// The backing file, or `VIRTIO_BLK_S_IOERR` once it was released.
    fn disk(&self) -> Result<&Disk, u8> {
        self.disk.as_deref().ok_or(S_IOERR)
    }

    /// Counts `n` requests left uncompleted because the device was pulled out
    /// ([`InFlightPolicy::Drop`](crate::virtio::InFlightPolicy::Drop)).
    pub fn count_dropped(&self, n: u64) {
        self.stats.add(Counter::DroppedOnRemoval, n);
    }

    /// Writes `status` and returns the used length (`written` data bytes and the status byte).
    fn complete(&self, mem: &GuestRam, status_addr: GuestAddress, status: u8, written: u32) -> u32 {
        match status {
            S_IOERR => self.stats.add(Counter::IoErrors, 1),
            S_UNSUPP => self.stats.add(Counter::Unsupported, 1),
            _ => {}
        }
        if mem.write_obj(status, status_addr).is_err() {
            self.stats.add(Counter::MalformedChains, 1);
            return 0;
        }
        written.saturating_add(1)
    }

    /// What the parsed request needs: a host operation (the slot filled in), nothing more (done,
    /// OK), or a status to fail with.
    fn prepare(&self, mem: &GuestRam, slot: &mut Slot) -> Result<Plan, u8> {
        if let Some(fault) = self.layout.chain_fault() {
            debug!("virtio-blk: bad request chain: {fault:?}");
            return Err(S_IOERR);
        }
        let header = self.layout.header().ok_or(S_IOERR)?;
        match header.request_type {
            RequestType::In => {
                self.stats.add(Counter::Reads, 1);
                let len = self.layout.writable_len();
                if self.layout.readable_len() != 0 {
                    return Err(S_IOERR);
                }
                self.data_io(mem, slot, header.sector, len, self.layout.writable(), true)?;
                Ok(Plan::Host(IoKind::Read))
            }
            RequestType::Out => {
                self.stats.add(Counter::Writes, 1);
                let len = self.layout.readable_len();
                if self.disk()?.readonly() || self.layout.writable_len() != 0 {
                    return Err(S_IOERR);
                }
                self.data_io(mem, slot, header.sector, len, self.layout.readable(), false)?;
                if slot.offset == 0 && self.disk()?.probed_raw() {
                    let mut head = [0u8; HEADER_PROBE_BYTES];
                    let n = head.len().min(len as usize);
                    if !read_data(mem, self.layout.readable(), 0, &mut head[..n])
                        || !self.disk()?.write_allowed(0, &head[..n])
                    {
                        // The guest's doing, and it may repeat it: not worth a warning each.
                        debug!("virtio-blk: refused an image header written to sector 0 of a probed raw disk");
                        return Err(S_IOERR);
                    }
                }
                Ok(Plan::Host(IoKind::Write))
            }
            RequestType::Flush => {
                self.stats.add(Counter::Flushes, 1);
                let disk = self.disk()?;
                if disk.readonly() {
                    // Nothing was written: nothing to make durable.
                    return Ok(Plan::Done(0));
                }
                slot.fd = disk.as_raw_fd();
                Ok(Plan::Host(IoKind::Flush))
            }
            RequestType::GetId => {
                self.stats.add(Counter::GetIds, 1);
                self.get_id(mem).map(Plan::Done)
            }
            RequestType::Discard => {
                self.stats.add(Counter::Discards, 1);
                self.discard_or_write_zeroes(mem, slot, false)
            }
            RequestType::WriteZeroes => {
                self.stats.add(Counter::WriteZeroes, 1);
                self.discard_or_write_zeroes(mem, slot, true)
            }
            RequestType::Unsupported(ty) => {
                debug!("virtio-blk: unsupported request type {ty}");
                Err(S_UNSUPP)
            }
        }
    }

    /// Fills `slot` for reading or writing `len` bytes at `sector` to or from `segments`:
    /// whole sectors, inside the disk, every byte in guest memory. A read keeps the segments,
    /// to mark them dirty when the data has landed.
    fn data_io(
        &self,
        mem: &GuestRam,
        slot: &mut Slot,
        sector: u64,
        len: u64,
        segments: &[Segment],
        read: bool,
    ) -> Result<(), u8> {
        if !len.is_multiple_of(SECTOR_SIZE) {
            return Err(S_IOERR);
        }
        let disk = self.disk()?;
        slot.offset = disk.byte_range(sector, len).ok_or(S_IOERR)?;
        // The chain is at most 2^32 - 1 bytes long (virtio-queue enforces it).
        slot.len = u32::try_from(len).map_err(|_| S_IOERR)?;
        slot.fd = disk.as_raw_fd();
        for seg in segments {
            if read {
                slot.segments.push(*seg);
            }
            for part in GuestMemoryBackend::get_slices(mem, seg.addr, seg.len as usize) {
                // The parser checked every buffer is in guest memory: this is no backend error.
                let part = part.map_err(|_| S_IOERR)?;
                // The pointer stays valid after the guard: guest memory is an mmap that lives
                // as long as the memory object the I/O thread holds (no Xen-style mapping).
                let ptr = part.ptr_guard_mut().as_ptr();
                slot.iovecs.push(IoVec::new(ptr, part.len()));
            }
        }
        // The host takes at most UIO_MAXIOV iovecs in one call: more is the guest's doing (a
        // queue larger than 1026 entries, every segment its own descriptor), not a backend
        // failure.
        if slot.iovecs.len() > libc::UIO_MAXIOV as usize {
            return Err(S_IOERR);
        }
        Ok(())
    }

    /// VIRTIO_BLK_T_GET_ID: as much of the serial as the writable data holds.
    fn get_id(&self, mem: &GuestRam) -> Outcome {
        if self.layout.writable_len() == 0 {
            return Err(S_IOERR);
        }
        let n = write_data(mem, self.layout.writable(), &self.serial).ok_or(S_IOERR)?;
        Ok(n as u32)
    }

    /// VIRTIO_BLK_T_DISCARD and VIRTIO_BLK_T_WRITE_ZEROES: the readable data is an array of
    /// `virtio_blk_discard_write_zeroes`. Every segment is checked before any is executed. A
    /// raw image's are done here (`fallocate` does not block for long); a qcow2 image's become
    /// a host operation (the ranges in `slot`), since they change the image's mappings and
    /// must wait for requests using them (see the `qcow2` module).
    fn discard_or_write_zeroes(
        &self,
        mem: &GuestRam,
        slot: &mut Slot,
        zeroes: bool,
    ) -> Result<Plan, u8> {
        let (feature, max_seg) = if zeroes {
            (VIRTIO_BLK_F_WRITE_ZEROES, MAX_WRITE_ZEROES_SEG)
        } else {
            (VIRTIO_BLK_F_DISCARD, MAX_DISCARD_SEG)
        };
        if self.disk()?.readonly() {
            return Err(S_IOERR);
        }
        if self.features & (1 << feature) == 0 {
            return Err(S_UNSUPP);
        }
        let len = self.layout.readable_len();
        if len == 0 || !len.is_multiple_of(DISCARD_WRITE_ZEROES_SEGMENT_SIZE) {
            return Err(S_IOERR);
        }
        let count = len / DISCARD_WRITE_ZEROES_SEGMENT_SIZE;
        if count > u64::from(max_seg) {
            return Err(S_IOERR);
        }
        for i in 0..count {
            let (offset, len, unmap) = self.range(mem, i, zeroes)?;
            slot.ranges.push(DiscardRange { offset, len, unmap });
        }
        let disk = self.disk()?;
        if disk.qcow2().is_some() {
            return Ok(Plan::Host(if zeroes {
                IoKind::WriteZeroes
            } else {
                IoKind::Discard
            }));
        }
        for r in &slot.ranges {
            let done = if zeroes {
                disk.write_zeroes(r.offset, r.len, r.unmap)
            } else {
                disk.discard(r.offset, r.len)
            };
            done.map_err(|e| self.host_error(if zeroes { "write zeroes" } else { "discard" }, e))?;
        }
        Ok(Plan::Done(0))
    }

    /// Segment `index` of a discard/write-zeroes request as (byte offset, byte length, unmap).
    fn range(&self, mem: &GuestRam, index: u64, zeroes: bool) -> Result<(u64, u64, bool), u8> {
        let mut raw = [0u8; DISCARD_WRITE_ZEROES_SEGMENT_SIZE as usize];
        let at = index * DISCARD_WRITE_ZEROES_SEGMENT_SIZE;
        if !read_data(mem, self.layout.readable(), at, &mut raw) {
            return Err(S_IOERR);
        }
        let mut sector = [0u8; 8];
        sector.copy_from_slice(&raw[0..8]);
        let mut num = [0u8; 4];
        num.copy_from_slice(&raw[8..12]);
        let mut flags = [0u8; 4];
        flags.copy_from_slice(&raw[12..16]);
        let (sector, num, flags) = (
            u64::from_le_bytes(sector),
            u32::from_le_bytes(num),
            u32::from_le_bytes(flags),
        );
        // §5.2.6.2: unknown flags, and unmap on a discard, are unsupported.
        let unmap = flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
        if flags & !VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0 || (unmap && !zeroes) {
            return Err(S_UNSUPP);
        }
        let max = if zeroes {
            MAX_WRITE_ZEROES_SECTORS
        } else {
            MAX_DISCARD_SECTORS
        };
        if num > max {
            return Err(S_IOERR);
        }
        let bytes = u64::from(num) * SECTOR_SIZE;
        let offset = self.disk()?.byte_range(sector, bytes).ok_or(S_IOERR)?;
        Ok((offset, bytes, unmap))
    }
}

/// Marks the guest memory a read filled as dirty, for a migration's next pass (KVM's dirty
/// log sees only the vCPUs' writes). Done once the data has landed, never before: a page sent
/// between the mark and the data would go stale on the destination.
fn mark_dirty(mem: &GuestRam, segments: &[Segment]) {
    for seg in segments {
        for part in GuestMemoryBackend::get_slices(mem, seg.addr, seg.len as usize).flatten() {
            part.bitmap().mark_dirty(0, part.len());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::block::testing::*;
    use virtio_bindings::virtio_blk::{
        VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
        VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
    };

    const HDR: u64 = BUF;
    const DATA: u64 = BUF + 0x1000;
    const STATUS: u64 = BUF + 0x800;
    const RANGES: u64 = BUF + 0x900;

    /// Fills `len` bytes of guest memory at `addr` with `byte`.
    fn fill(mem: &GuestRam, addr: u64, len: usize, byte: u8) {
        mem.write_slice(&vec![byte; len], GuestAddress(addr))
            .unwrap();
    }

    fn guest_bytes(mem: &GuestRam, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    fn expected(offset: u64, len: usize) -> Vec<u8> {
        (offset..offset + len as u64).map(pattern).collect()
    }

    /// Runs `descs` through a fresh read-write processor; returns (used len, status byte).
    fn run(
        mem: &GuestRam,
        tmp: &vmm_sys_util::tempfile::TempFile,
        descs: &[virtio_queue::desc::RawDescriptor],
    ) -> (u32, u8) {
        let (mut p, _) = processor(tmp, false, 8);
        fill(mem, STATUS, 1, 0xee);
        let used = with_chain(mem, descs, |c| p.process(c));
        (used, status(mem, STATUS))
    }

    #[test]
    fn read_spanning_descriptors() {
        let mem = guest_memory();
        let tmp = image();
        put_header(&mem, HDR, VIRTIO_BLK_T_IN, 3);
        let descs = [
            desc(HDR, 16, 0),
            desc(DATA, 512, W),
            desc(DATA + 0x1000, 1024, W),
            desc(STATUS, 1, W),
        ];
        let (used, st) = run(&mem, &tmp, &descs);
        assert_eq!((used, st), (1536 + 1, S_OK));
        assert_eq!(guest_bytes(&mem, DATA, 512), expected(3 * 512, 512));
        assert_eq!(
            guest_bytes(&mem, DATA + 0x1000, 1024),
            expected(4 * 512, 1024)
        );
    }

    #[test]
    fn a_pull_during_the_host_io_decides_the_completion() {
        let mem = guest_memory();
        let tmp = image();
        let (mut p, stats) = processor(&tmp, false, 8);
        put_header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
        let descs = [desc(HDR, 16, 0), desc(DATA, 512, W), desc(STATUS, 1, W)];
        // Pulled with policy fail while reading: the read happened, the request fails.
        fill(&mem, STATUS, 1, 0xee);
        let used = with_chain(&mem, &descs, |c| p.process_then(c, || Completion::Fail));
        assert_eq!((used, status(&mem, STATUS)), (Some(1), S_IOERR));
        let snap = stats.snapshot();
        assert_eq!(
            (snap.reads, snap.failed_on_removal, snap.io_errors),
            (1, 1, 1)
        );
        // Reset, or pulled with policy drop: nothing is written for it.
        fill(&mem, STATUS, 1, 0xee);
        let used = with_chain(&mem, &descs, |c| p.process_then(c, || Completion::Discard));
        assert_eq!((used, status(&mem, STATUS)), (None, 0xee));
        // Still plugged: published as done.
        let used = with_chain(&mem, &descs, |c| p.process_then(c, || Completion::Publish));
        assert_eq!((used, status(&mem, STATUS)), (Some(513), S_OK));
        assert_eq!(stats.snapshot().failed_on_removal, 1);
    }

    #[test]
    fn fail_completes_with_ioerr_without_doing_the_request() {
        let mem = guest_memory();
        let tmp = image();
        let (mut p, stats) = processor(&tmp, false, 8);
        put_header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
        fill(&mem, DATA, 512, 0xaa);
        fill(&mem, STATUS, 1, 0xee);
        let descs = [desc(HDR, 16, 0), desc(DATA, 512, W), desc(STATUS, 1, W)];
        let used = with_chain(&mem, &descs, |c| p.fail(c));
        assert_eq!((used, status(&mem, STATUS)), (1, S_IOERR));
        assert_eq!(
            guest_bytes(&mem, DATA, 512),
            vec![0xaa; 512],
            "no data read"
        );
        let snap = stats.snapshot();
        assert_eq!(
            (snap.failed_on_removal, snap.io_errors, snap.reads),
            (1, 1, 0)
        );
        // A chain without a status byte cannot be failed, only returned.
        let used = with_chain(&mem, &[desc(HDR, 16, 0)], |c| p.fail(c));
        assert_eq!(used, 0);
        assert_eq!(stats.snapshot().malformed_chains, 1);
    }

    #[test]
    fn backend_failures_reach_the_observer_guest_faults_do_not() {
        #[derive(Default)]
        struct Seen(std::sync::Mutex<Vec<String>>);
        impl BackendErrorObserver for Seen {
            fn backend_error(&self, operation: &str, _error: &std::io::Error) {
                self.0.lock().unwrap().push(operation.to_string());
            }
        }
        let mem = guest_memory();
        let tmp = image();
        // An image the host can no longer read (opened write-only: EBADF on every pread).
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(tmp.as_path())
            .unwrap();
        let disk = Arc::new(Disk::from_file(file, false).unwrap());
        let stats = Arc::new(BlockStats::default());
        let seen = Arc::new(Seen::default());
        let mut p = RequestProcessor::new(disk, "s", u64::MAX, 8, stats.clone())
            .with_backend_error_observer(Some(seen.clone()));
        put_header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
        let descs = [desc(HDR, 16, 0), desc(DATA, 512, W), desc(STATUS, 1, W)];
        let used = with_chain(&mem, &descs, |c| p.process(c));
        assert_eq!((used, status(&mem, STATUS)), (1, S_IOERR));
        assert_eq!(*seen.0.lock().unwrap(), ["read"]);
        assert_eq!(stats.snapshot().backend_errors, 1);
        // A read into a buffer outside guest memory fails too, but the guest is at fault.
        let (p, stats) = processor(&tmp, false, 8);
        let seen = Arc::new(Seen::default());
        let mut p = p.with_backend_error_observer(Some(seen.clone()));
        let descs = [
            desc(HDR, 16, 0),
            desc(RAM_SIZE - 256, 512, W),
            desc(STATUS, 1, W),
        ];
        let used = with_chain(&mem, &descs, |c| p.process(c));
        assert_eq!((used, status(&mem, STATUS)), (1, S_IOERR));
        assert!(seen.0.lock().unwrap().is_empty());
        assert_eq!(stats.snapshot().backend_errors, 0);
    }

    #[test]
    fn write_then_flush() {
        let mem = guest_memory();
        let tmp = image();
        put_header(&mem, HDR, VIRTIO_BLK_T_OUT, 10);
        fill(&mem, DATA, 1024, 0x77);
        let (used, st) = run(
            &mem,
            &tmp,
            &[desc(HDR, 16, 0), desc(DATA, 1024, 0), desc(STATUS, 1, W)],
        );
        assert_eq!((used, st), (1, S_OK));
        assert_eq!(image_bytes(&tmp, 10 * 512, 1024), vec![0x77; 1024]);
        assert_eq!(image_bytes(&tmp, 9 * 512, 512), expected(9 * 512, 512));
        put_header(&mem, HDR, VIRTIO_BLK_T_FLUSH, 0);
        let (used, st) = run(&mem, &tmp, &[desc(HDR, 16, 0), desc(STATUS, 1, W)]);
        assert_eq!((used, st), (1, S_OK));
    }

    #[test]
    fn header_and_data_in_one_descriptor_and_header_split() {
        let mem = guest_memory();
        let tmp = image();
        // OUT: header immediately followed by its data in the same buffer.
        put_header(&mem, HDR, VIRTIO_BLK_T_OUT, 1);
        fill(&mem, HDR + 16, 512, 0x42);
        let (used, st) = run(&mem, &tmp, &[desc(HDR, 16 + 512, 0), desc(STATUS, 1, W)]);
        assert_eq!((used, st), (1, S_OK));
        assert_eq!(image_bytes(&tmp, 512, 512), vec![0x42; 512]);
        // IN: header split 5 + 11 bytes; data and status in one writable buffer.
        put_header(&mem, HDR, VIRTIO_BLK_T_IN, 2);
        let (mut p, _) = processor(&tmp, false, 8);
        let descs = [desc(HDR, 5, 0), desc(HDR + 5, 11, 0), desc(DATA, 513, W)];
        let used = with_chain(&mem, &descs, |c| p.process(c));
        assert_eq!(used, 513);
        assert_eq!(status(&mem, DATA + 512), S_OK);
        assert_eq!(guest_bytes(&mem, DATA, 512), expected(1024, 512));
    }

    #[test]
    fn get_id_pads_and_truncates() {
        let mem = guest_memory();
        let tmp = image();
        put_header(&mem, HDR, VIRTIO_BLK_T_GET_ID, 0);
        fill(&mem, DATA, 20, 0xff);
        let (used, st) = run(
            &mem,
            &tmp,
            &[desc(HDR, 16, 0), desc(DATA, 20, W), desc(STATUS, 1, W)],
        );
        assert_eq!((used, st), (21, S_OK));
        let mut id = b"test-serial".to_vec();
        id.resize(20, 0);
        assert_eq!(guest_bytes(&mem, DATA, 20), id);

        let disk = Arc::new(Disk::open(tmp.as_path(), false).unwrap());
        let long = "0123456789abcdefghijXYZ";
        let mut p = RequestProcessor::new(disk, long, 0, 8, Arc::default());
        let used = with_chain(
            &mem,
            &[desc(HDR, 16, 0), desc(DATA, 64, W), desc(STATUS, 1, W)],
            |c| p.process(c),
        );
        assert_eq!(used, 21);
        assert_eq!(guest_bytes(&mem, DATA, 20), &long.as_bytes()[..20]);
    }

    #[test]
    fn discard_and_write_zeroes() {
        let mem = guest_memory();
        let tmp = image();
        put_header(&mem, HDR, VIRTIO_BLK_T_WRITE_ZEROES, 0);
        put_range(&mem, RANGES, 8, 8, 0);
        put_range(&mem, RANGES + 16, 24, 8, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
        let (used, st) = run(
            &mem,
            &tmp,
            &[desc(HDR, 16, 0), desc(RANGES, 32, 0), desc(STATUS, 1, W)],
        );
        assert_eq!((used, st), (1, S_OK));
        assert_eq!(image_bytes(&tmp, 8 * 512, 4096), vec![0; 4096]);
        assert_eq!(image_bytes(&tmp, 24 * 512, 4096), vec![0; 4096]);
        assert_eq!(image_bytes(&tmp, 16 * 512, 512), expected(16 * 512, 512));

        put_header(&mem, HDR, VIRTIO_BLK_T_DISCARD, 0);
        put_range(&mem, RANGES, 40, 8, 0);
        let (used, st) = run(
            &mem,
            &tmp,
            &[desc(HDR, 16, 0), desc(RANGES, 16, 0), desc(STATUS, 1, W)],
        );
        assert_eq!((used, st), (1, S_OK));
        assert_eq!(tmp.as_file().metadata().unwrap().len(), IMAGE_SECTORS * 512);
    }

    #[test]
    fn discard_and_write_zeroes_refusals() {
        let mem = guest_memory();
        let tmp = image();
        let descs = [desc(HDR, 16, 0), desc(RANGES, 16, 0), desc(STATUS, 1, W)];
        let cases: [(u32, u64, u32, u32, u8); 7] = [
            // Discard with unmap, and any unknown flag: unsupported (§5.2.6.2).
            (
                VIRTIO_BLK_T_DISCARD,
                0,
                8,
                VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
                S_UNSUPP,
            ),
            (VIRTIO_BLK_T_DISCARD, 0, 8, 2, S_UNSUPP),
            (VIRTIO_BLK_T_WRITE_ZEROES, 0, 8, 0x8000_0001, S_UNSUPP),
            // Beyond the disk, overflowing, too long.
            (VIRTIO_BLK_T_WRITE_ZEROES, IMAGE_SECTORS - 1, 2, 0, S_IOERR),
            (VIRTIO_BLK_T_DISCARD, u64::MAX, 1, 0, S_IOERR),
            (VIRTIO_BLK_T_DISCARD, 0, MAX_DISCARD_SECTORS + 1, 0, S_IOERR),
            (
                VIRTIO_BLK_T_WRITE_ZEROES,
                0,
                MAX_WRITE_ZEROES_SECTORS + 1,
                0,
                S_IOERR,
            ),
        ];
        for (ty, sector, num, flags, want) in cases {
            put_header(&mem, HDR, ty, 0);
            put_range(&mem, RANGES, sector, num, flags);
            assert_eq!(
                run(&mem, &tmp, &descs),
                (1, want),
                "{ty} {sector} {num} {flags:#x}"
            );
        }
        assert_eq!(image_bytes(&tmp, 0, 1024), expected(0, 1024));
        // Payload not a whole number of segments, none at all, too many.
        put_header(&mem, HDR, VIRTIO_BLK_T_DISCARD, 0);
        for len in [15, 0, 16 * (MAX_DISCARD_SEG + 1)] {
            let d = [desc(HDR, 16, 0), desc(RANGES, len, 0), desc(STATUS, 1, W)];
            assert_eq!(run(&mem, &tmp, &d), (1, S_IOERR), "len {len}");
        }
        // A processor without the features negotiated.
        let disk = Arc::new(Disk::open(tmp.as_path(), false).unwrap());
        let mut p = RequestProcessor::new(disk, "x", 0, 8, Arc::default());
        put_range(&mem, RANGES, 0, 8, 0);
        with_chain(&mem, &descs, |c| p.process(c));
        assert_eq!(status(&mem, STATUS), S_UNSUPP);
    }

    #[test]
    fn unknown_type_is_unsupported() {
        let mem = guest_memory();
        let tmp = image();
        for ty in [2, 3, 14, 16, 0x8000_0000, u32::MAX] {
            put_header(&mem, HDR, ty, 0);
            let d = [desc(HDR, 16, 0), desc(DATA, 512, W), desc(STATUS, 1, W)];
            assert_eq!(run(&mem, &tmp, &d), (1, S_UNSUPP), "type {ty}");
        }
    }

    #[test]
    fn readonly_disk_refuses_writes() {
        let mem = guest_memory();
        let tmp = image();
        let (mut p, stats) = processor(&tmp, true, 8);
        put_range(&mem, RANGES, 0, 8, 0);
        fill(&mem, DATA, 512, 0);
        for ty in [
            VIRTIO_BLK_T_OUT,
            VIRTIO_BLK_T_DISCARD,
            VIRTIO_BLK_T_WRITE_ZEROES,
        ] {
            put_header(&mem, HDR, ty, 0);
            let data = if ty == VIRTIO_BLK_T_OUT { DATA } else { RANGES };
            let len = if ty == VIRTIO_BLK_T_OUT { 512 } else { 16 };
            let d = [desc(HDR, 16, 0), desc(data, len, 0), desc(STATUS, 1, W)];
            assert_eq!(with_chain(&mem, &d, |c| p.process(c)), 1);
            assert_eq!(status(&mem, STATUS), S_IOERR, "type {ty}");
        }
        assert_eq!(image_bytes(&tmp, 0, 4096), expected(0, 4096));
        put_header(&mem, HDR, VIRTIO_BLK_T_FLUSH, 0);
        with_chain(&mem, &[desc(HDR, 16, 0), desc(STATUS, 1, W)], |c| {
            p.process(c)
        });
        assert_eq!(status(&mem, STATUS), S_OK);
        put_header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
        let d = [desc(HDR, 16, 0), desc(DATA, 512, W), desc(STATUS, 1, W)];
        assert_eq!(with_chain(&mem, &d, |c| p.process(c)), 513);
        assert_eq!(stats.snapshot().io_errors, 3);
    }

    #[test]
    fn hostile_sector_ranges() {
        let mem = guest_memory();
        let tmp = image();
        for (ty, sector, flags) in [
            (VIRTIO_BLK_T_IN, IMAGE_SECTORS, W),
            (VIRTIO_BLK_T_IN, IMAGE_SECTORS - 1, W), // 1024 bytes from the last sector
            (VIRTIO_BLK_T_OUT, IMAGE_SECTORS, 0),
            (VIRTIO_BLK_T_IN, u64::MAX, W), // sector * 512 overflows
            (VIRTIO_BLK_T_OUT, u64::MAX >> 9, 0), // offset + len overflows
        ] {
            put_header(&mem, HDR, ty, sector);
            let d = [
                desc(HDR, 16, 0),
                desc(DATA, 1024, flags),
                desc(STATUS, 1, W),
            ];
            assert_eq!(
                run(&mem, &tmp, &d),
                (1, S_IOERR),
                "type {ty} sector {sector:#x}"
            );
        }
        assert_eq!(
            image_bytes(&tmp, 0, IMAGE_SECTORS as usize * 512),
            expected(0, IMAGE_SECTORS as usize * 512)
        );
    }

    #[test]
    fn hostile_data_outside_guest_memory() {
        let mem = guest_memory();
        let tmp = image();
        put_header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
        for (addr, len) in [
            (RAM_SIZE, 512),       // just past RAM
            (RAM_SIZE - 256, 512), // straddling the end
            (u64::MAX - 255, 512), // address + length overflows
        ] {
            let d = [desc(HDR, 16, 0), desc(addr, len, W), desc(STATUS, 1, W)];
            assert_eq!(run(&mem, &tmp, &d), (1, S_IOERR), "addr {addr:#x}");
        }
        // A header outside RAM: IOERR as well.
        let d = [
            desc(RAM_SIZE, 16, 0),
            desc(DATA, 512, W),
            desc(STATUS, 1, W),
        ];
        assert_eq!(run(&mem, &tmp, &d), (1, S_IOERR));
    }

    #[test]
    fn hostile_status_outside_guest_memory() {
        let mem = guest_memory();
        let tmp = image();
        let (mut p, stats) = processor(&tmp, false, 8);
        put_header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
        fill(&mem, DATA, 512, 0xcc);
        for status_addr in [RAM_SIZE, u64::MAX] {
            let d = [
                desc(HDR, 16, 0),
                desc(DATA, 512, W),
                desc(status_addr, 1, W),
            ];
            assert_eq!(with_chain(&mem, &d, |c| p.process(c)), 0);
        }
        // Nothing was served: the data buffer is untouched.
        assert_eq!(guest_bytes(&mem, DATA, 512), vec![0xcc; 512]);
        assert_eq!(stats.snapshot().malformed_chains, 2);
    }

    #[test]
    fn hostile_wrong_direction() {
        let mem = guest_memory();
        let tmp = image();
        // IN whose data is device-readable.
        put_header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
        let d = [desc(HDR, 16, 0), desc(DATA, 512, 0), desc(STATUS, 1, W)];
        assert_eq!(run(&mem, &tmp, &d), (1, S_IOERR));
        // OUT whose data is device-writable.
        put_header(&mem, HDR, VIRTIO_BLK_T_OUT, 0);
        let d = [desc(HDR, 16, 0), desc(DATA, 512, W), desc(STATUS, 1, W)];
        assert_eq!(run(&mem, &tmp, &d), (1, S_IOERR));
        assert_eq!(image_bytes(&tmp, 0, 512), expected(0, 512));
        // GET_ID whose buffer is device-readable.
        put_header(&mem, HDR, VIRTIO_BLK_T_GET_ID, 0);
        let d = [desc(HDR, 16, 0), desc(DATA, 20, 0), desc(STATUS, 1, W)];
        assert_eq!(run(&mem, &tmp, &d), (1, S_IOERR));
        // Header device-writable: no header at all.
        let d = [desc(HDR, 16, W), desc(STATUS, 1, W)];
        assert_eq!(run(&mem, &tmp, &d), (1, S_IOERR));
    }

    #[test]
    fn hostile_short_header() {
        let mem = guest_memory();
        let tmp = image();
        put_header(&mem, HDR, VIRTIO_BLK_T_FLUSH, 0);
        for len in [0, 1, 8, 15] {
            let d = [desc(HDR, len, 0), desc(STATUS, 1, W)];
            assert_eq!(run(&mem, &tmp, &d), (1, S_IOERR), "header of {len} bytes");
        }
    }

    #[test]
    fn hostile_missing_status() {
        let mem = guest_memory();
        let tmp = image();
        let (mut p, stats) = processor(&tmp, false, 8);
        put_header(&mem, HDR, VIRTIO_BLK_T_OUT, 0);
        fill(&mem, DATA, 512, 0x11);
        // The last descriptor is device-readable: no status, nothing done.
        let d = [desc(HDR, 16, 0), desc(DATA, 512, 0), desc(STATUS, 1, 0)];
        assert_eq!(with_chain(&mem, &d, |c| p.process(c)), 0);
        // Only a header.
        assert_eq!(with_chain(&mem, &[desc(HDR, 16, 0)], |c| p.process(c)), 0);
        assert_eq!(image_bytes(&tmp, 0, 512), expected(0, 512));
        assert_eq!(stats.snapshot().malformed_chains, 2);
        assert_eq!(stats.snapshot().writes, 0);
    }

    #[test]
    fn hostile_zero_length_status() {
        let mem = guest_memory();
        let tmp = image();
        // The zero-length descriptor carries nothing: the status byte is the last byte of the
        // data buffer, which leaves 511 bytes of data: not whole sectors.
        put_header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
        fill(&mem, STATUS, 1, 0xee);
        let (mut p, _) = processor(&tmp, false, 8);
        let d = [desc(HDR, 16, 0), desc(DATA, 512, W), desc(STATUS, 0, W)];
        assert_eq!(with_chain(&mem, &d, |c| p.process(c)), 1);
        assert_eq!(status(&mem, DATA + 511), S_IOERR);
        assert_eq!(status(&mem, STATUS), 0xee);
    }

    #[test]
    fn hostile_partial_sectors() {
        let mem = guest_memory();
        let tmp = image();
        for (ty, flags) in [(VIRTIO_BLK_T_IN, W), (VIRTIO_BLK_T_OUT, 0)] {
            put_header(&mem, HDR, ty, 0);
            for len in [1, 511, 513, 1000] {
                let d = [desc(HDR, 16, 0), desc(DATA, len, flags), desc(STATUS, 1, W)];
                assert_eq!(run(&mem, &tmp, &d), (1, S_IOERR), "type {ty} len {len}");
            }
        }
        assert_eq!(image_bytes(&tmp, 0, 1024), expected(0, 1024));
    }

    #[test]
    fn hostile_descriptor_loop_terminates() {
        let mem = guest_memory();
        let tmp = image();
        let (mut p, stats) = processor(&tmp, false, 8);
        put_header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
        // 0 -> 1 -> 2 -> 1 -> ...
        let d = [
            desc_next(HDR, 16, N, 1),
            desc_next(DATA, 512, W | N, 2),
            desc_next(STATUS, 1, W | N, 1),
        ];
        assert_eq!(with_raw_chain(&mem, &d, 0, |c| p.process(c)), 0);
        // Self loop on the head.
        let d = [desc_next(HDR, 16, N, 0)];
        assert_eq!(with_raw_chain(&mem, &d, 0, |c| p.process(c)), 0);
        assert_eq!(stats.snapshot().malformed_chains, 2);
    }

    #[test]
    fn hostile_next_index_out_of_table() {
        let mem = guest_memory();
        let tmp = image();
        let (mut p, _) = processor(&tmp, false, 8);
        put_header(&mem, HDR, VIRTIO_BLK_T_FLUSH, 0);
        fill(&mem, STATUS, 1, 0xee);
        let d = [desc_next(HDR, 16, N, 1), desc_next(STATUS, 1, W | N, 200)];
        assert_eq!(with_raw_chain(&mem, &d, 0, |c| p.process(c)), 0);
        assert_eq!(status(&mem, STATUS), 0xee);
    }

    #[test]
    fn hostile_readable_after_writable() {
        let mem = guest_memory();
        let tmp = image();
        put_header(&mem, HDR, VIRTIO_BLK_T_OUT, 0);
        fill(&mem, STATUS, 1, 0xee);
        let d = [
            desc(HDR, 16, 0),
            desc(STATUS, 1, W),
            desc(DATA, 512, 0),
            desc(STATUS + 1, 1, W),
        ];
        let (mut p, _) = processor(&tmp, false, 8);
        assert_eq!(with_chain(&mem, &d, |c| p.process(c)), 0);
        assert_eq!(status(&mem, STATUS), 0xee);
        assert_eq!(image_bytes(&tmp, 0, 512), expected(0, 512));
    }

    #[test]
    fn hostile_too_many_segments() {
        let mem = guest_memory();
        let tmp = image();
        put_header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
        let (mut p, _) = processor(&tmp, false, 4);
        let mut d = vec![desc(HDR, 16, 0)];
        d.extend((0..5).map(|i| desc(DATA + i * 512, 512, W)));
        d.push(desc(STATUS, 1, W));
        assert_eq!(with_chain(&mem, &d, |c| p.process(c)), 1);
        assert_eq!(status(&mem, STATUS), S_IOERR);
        // Exactly seg_max is fine.
        d.remove(5);
        assert_eq!(with_chain(&mem, &d, |c| p.process(c)), 4 * 512 + 1);
        assert_eq!(status(&mem, STATUS), S_OK);
    }

    #[test]
    fn hostile_empty_chain() {
        let mem = guest_memory();
        let tmp = image();
        let (mut p, _) = processor(&tmp, false, 8);
        assert_eq!(with_chain(&mem, &[desc(HDR, 0, 0)], |c| p.process(c)), 0);
        assert_eq!(with_chain(&mem, &[desc(HDR, 0, W)], |c| p.process(c)), 0);
    }

    #[test]
    fn indirect_chain() {
        let mem = guest_memory();
        let tmp = image();
        let table = BUF + 0x8000;
        put_header(&mem, HDR, VIRTIO_BLK_T_IN, 5);
        for (i, d) in [
            desc_next(HDR, 16, N, 1),
            desc_next(DATA, 512, W | N, 2),
            desc_next(STATUS, 1, W, 0),
        ]
        .iter()
        .enumerate()
        {
            mem.write_obj(*d, GuestAddress(table + 16 * i as u64))
                .unwrap();
        }
        let indirect = virtio_bindings::bindings::virtio_ring::VRING_DESC_F_INDIRECT as u16;
        let (mut p, _) = processor(&tmp, false, 8);
        let used = with_raw_chain(&mem, &[desc_next(table, 48, indirect, 0)], 0, |c| {
            p.process(c)
        });
        assert_eq!(used, 513);
        assert_eq!(status(&mem, STATUS), S_OK);
        assert_eq!(guest_bytes(&mem, DATA, 512), expected(5 * 512, 512));
        // An indirect table outside guest memory: nothing to work with.
        let used = with_raw_chain(&mem, &[desc_next(RAM_SIZE, 48, indirect, 0)], 0, |c| {
            p.process(c)
        });
        assert_eq!(used, 0);
    }

    #[test]
    fn stats_count_requests() {
        let mem = guest_memory();
        let tmp = image();
        let (mut p, stats) = processor(&tmp, false, 8);
        put_header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
        let d = [desc(HDR, 16, 0), desc(DATA, 1024, W), desc(STATUS, 1, W)];
        with_chain(&mem, &d, |c| p.process(c));
        put_header(&mem, HDR, VIRTIO_BLK_T_OUT, 0);
        let d = [desc(HDR, 16, 0), desc(DATA, 512, 0), desc(STATUS, 1, W)];
        with_chain(&mem, &d, |c| p.process(c));
        put_header(&mem, HDR, 99, 0);
        with_chain(&mem, &d, |c| p.process(c));
        let s = stats.snapshot();
        assert_eq!((s.reads, s.writes, s.unsupported), (1, 1, 1));
        assert_eq!((s.bytes_read, s.bytes_written), (1024, 512));
    }
}
