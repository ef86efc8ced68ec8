//! Test fixtures: guest memory with a driver-side queue (virtio-queue's mock), descriptors,
//! request headers and disk images.

use std::os::unix::fs::FileExt;
use std::sync::Arc;

use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::tempfile::TempFile;

use std::io;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use super::disk::Disk;
use super::executor::RequestProcessor;
use super::host_io::{HostOp, HostResult, IoEngine, IoVec};
use super::stats::BlockStats;
use super::Block;
use crate::virtio::{
    ActivateError, ActiveQueue, GuestMemory, GuestRam, VirtioDevice, VirtioInterrupt,
    VirtioInterruptType,
};
use vm_memory::GuestMemoryAtomic;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Guest RAM in tests: 2 MiB at 0. The queue lives at 0, buffers at [`BUF`] and above.
pub const RAM_SIZE: u64 = 0x20_0000;
/// Where tests put headers and data.
pub const BUF: u64 = 0x1_0000;
/// Descriptor flag: device-writable.
pub const W: u16 = VRING_DESC_F_WRITE as u16;
/// Descriptor flag: chained.
pub const N: u16 = VRING_DESC_F_NEXT as u16;
/// Disk size of [`image`]: 64 sectors.
pub const IMAGE_SECTORS: u64 = 64;

/// Fresh guest memory.
pub fn guest_memory() -> GuestRam {
    GuestRam::from_ranges(&[(GuestAddress(0), RAM_SIZE as usize)]).unwrap()
}

/// A descriptor (`next` is filled in by `build_desc_chain`).
pub fn desc(addr: u64, len: u32, flags: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
}

/// A descriptor with an explicit `next`.
pub fn desc_next(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
}

/// Writes a request header (`type`, reserved 0, `sector`) at `addr`.
pub fn put_header(mem: &GuestRam, addr: u64, ty: u32, sector: u64) {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&ty.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&h, GuestAddress(addr)).unwrap();
}

/// Writes a discard/write-zeroes segment at `addr`.
pub fn put_range(mem: &GuestRam, addr: u64, sector: u64, num: u32, flags: u32) {
    let mut r = [0u8; 16];
    r[0..8].copy_from_slice(&sector.to_le_bytes());
    r[8..12].copy_from_slice(&num.to_le_bytes());
    r[12..16].copy_from_slice(&flags.to_le_bytes());
    mem.write_slice(&r, GuestAddress(addr)).unwrap();
}

/// Byte `i` of the test image.
pub fn pattern(i: u64) -> u8 {
    (i % 251) as u8 ^ 0x5a
}

/// A temporary image of [`IMAGE_SECTORS`] sectors filled with [`pattern`].
pub fn image() -> TempFile {
    let tmp = TempFile::new().unwrap();
    let bytes: Vec<u8> = (0..IMAGE_SECTORS * 512).map(pattern).collect();
    tmp.as_file().write_all_at(&bytes, 0).unwrap();
    tmp
}

/// Reads `len` bytes of the image at `offset`.
pub fn image_bytes(tmp: &TempFile, offset: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    tmp.as_file().read_exact_at(&mut v, offset).unwrap();
    v
}

/// A processor on `tmp` with every feature negotiated.
pub fn processor(
    tmp: &TempFile,
    readonly: bool,
    seg_max: u32,
) -> (RequestProcessor, Arc<BlockStats>) {
    let disk = Arc::new(Disk::open(tmp.as_path(), readonly).unwrap());
    let stats = Arc::new(BlockStats::default());
    let p = RequestProcessor::new(disk, "test-serial", u64::MAX, seg_max, stats.clone());
    (p, stats)
}

/// Publishes `descs` as one chain at table index 0 (NEXT flags and indices are set) and runs
/// `f` on the chain the device pops.
pub fn with_chain<R>(
    mem: &GuestRam,
    descs: &[RawDescriptor],
    f: impl FnOnce(DescriptorChain<&GuestRam>) -> R,
) -> R {
    let q = MockSplitQueue::new(mem, 16);
    f(q.build_desc_chain(descs).unwrap())
}

/// Publishes `descs` verbatim (flags and `next` as given) with head index `head` and runs `f`
/// on the chain the device pops.
pub fn with_raw_chain<R>(
    mem: &GuestRam,
    descs: &[RawDescriptor],
    head: u16,
    f: impl FnOnce(DescriptorChain<&GuestRam>) -> R,
) -> R {
    let q = MockSplitQueue::new(mem, 16);
    for (i, d) in descs.iter().enumerate() {
        q.desc_table().store(i as u16, *d).unwrap();
    }
    q.avail().ring().ref_at(0).unwrap().store(head);
    q.avail().idx().store(1);
    let mut queue: Queue = q.create_queue().unwrap();
    let chain = queue.iter(mem).unwrap().next().unwrap();
    f(chain)
}

/// The status byte at `addr`.
pub fn status(mem: &GuestRam, addr: u64) -> u8 {
    mem.read_obj(GuestAddress(addr)).unwrap()
}

/// Waits for `n` completions.
pub fn reap_n(engine: &mut dyn IoEngine, n: usize) -> Vec<(u16, HostResult)> {
    let mut out = Vec::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while out.len() < n {
        assert!(std::time::Instant::now() < deadline, "completions lost");
        let mut pfd = libc::pollfd {
            fd: engine.completion_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        unsafe { libc::poll(&mut pfd, 1, 100) };
        engine.reap(&mut out);
    }
    out
}

/// 32 reads of 4 KiB at once, a write, a flush: every tag completes once, with its bytes.
pub fn engine_runs_many_requests_at_once(engine: &mut dyn IoEngine) {
    let tmp = TempFile::new().unwrap();
    let data: Vec<u8> = (0..32 * 4096u32).map(|i| (i / 4096) as u8).collect();
    tmp.as_file().write_all_at(&data, 0).unwrap();
    let fd = tmp.as_file().as_raw_fd();
    let mut bufs = vec![[0u8; 4096]; 32];
    let mut iovs: Vec<IoVec> = bufs
        .iter_mut()
        .map(|b| IoVec::new(b.as_mut_ptr(), 4096))
        .collect();
    for (i, iov) in iovs.iter_mut().enumerate() {
        let op = HostOp::Read {
            fd,
            offset: (31 - i as u64) * 4096,
            iov,
            iovcnt: 1,
        };
        // SAFETY: `bufs` and `iovs` outlive the completions reaped below.
        unsafe { engine.push(i as u16, op).unwrap() };
    }
    engine.submit().unwrap();
    let mut done = reap_n(engine, 32);
    done.sort();
    let want: Vec<(u16, HostResult)> = (0..32).map(|i| (i, Ok(4096))).collect();
    assert_eq!(done, want);
    for (i, b) in bufs.iter().enumerate() {
        assert!(b.iter().all(|&x| x == 31 - i as u8), "buffer {i}");
    }
    let mut src = [0xabu8; 512];
    let mut iov = IoVec::new(src.as_mut_ptr(), 512);
    let write = HostOp::Write {
        fd,
        offset: 512,
        iov: &mut iov,
        iovcnt: 1,
    };
    // SAFETY: `src` and `iov` outlive the completion.
    unsafe { engine.push(7, write).unwrap() };
    engine.submit().unwrap();
    assert_eq!(reap_n(engine, 1), [(7, Ok(512))]);
    // SAFETY: no pointers.
    unsafe { engine.push(9, HostOp::Flush { fd }).unwrap() };
    engine.submit().unwrap();
    assert_eq!(reap_n(engine, 1), [(9, Ok(0))]);
    let mut back = [0u8; 512];
    tmp.as_file().read_exact_at(&mut back, 512).unwrap();
    assert_eq!(back, [0xab; 512]);
    // A bad descriptor completes with its errno.
    // SAFETY: no pointers.
    unsafe { engine.push(3, HostOp::Flush { fd: -1 }).unwrap() };
    engine.submit().unwrap();
    assert_eq!(reap_n(engine, 1), [(3, Err(libc::EBADF))]);
}

#[derive(Default)]
pub struct CountingInterrupt {
    /// Queue 0 interrupts raised.
    pub queue: AtomicUsize,
    /// Configuration-change interrupts raised.
    pub config: AtomicUsize,
}

impl VirtioInterrupt for CountingInterrupt {
    fn trigger(&self, kind: VirtioInterruptType) -> io::Result<()> {
        match kind {
            VirtioInterruptType::Queue(0) => self.queue.fetch_add(1, Ordering::SeqCst),
            VirtioInterruptType::Queue(_) => panic!("unexpected queue"),
            VirtioInterruptType::Config => self.config.fetch_add(1, Ordering::SeqCst),
        };
        Ok(())
    }
}

/// Waits up to 10 s for `cond`.
pub fn wait_for(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// An engine whose completions the test decides: what is pushed waits until
/// [`ManualEngine::complete`] runs it, in the order the test gives.
pub struct ManualEngine {
    pending: std::sync::Mutex<Vec<(u16, HostOp)>>,
    done: std::sync::Mutex<Vec<(u16, HostResult)>>,
    signal: vmm_sys_util::eventfd::EventFd,
}

impl ManualEngine {
    fn new() -> Self {
        ManualEngine {
            pending: Default::default(),
            done: Default::default(),
            signal: vmm_sys_util::eventfd::EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK)
                .unwrap(),
        }
    }

    /// The operations waiting, as (tag, "read" | "write" | "flush" | "discard"), in the order
    /// pushed.
    pub fn pending(&self) -> Vec<(u16, &'static str)> {
        let kind = |op: &HostOp| match op {
            HostOp::Read { .. } => "read",
            HostOp::Write { .. } => "write",
            HostOp::Flush { .. } => "flush",
            HostOp::Discard { .. } => "discard",
        };
        let pending = self.pending.lock().unwrap();
        pending.iter().map(|(tag, op)| (*tag, kind(op))).collect()
    }

    /// Waits until `n` operations are waiting.
    pub fn wait_pending(&self, n: usize) {
        wait_for(&format!("{n} operations in the engine"), || {
            self.pending.lock().unwrap().len() == n
        });
    }

    /// Runs the waiting operations at positions `order` (of [`pending`](Self::pending)), in that
    /// order, and signals their completions once.
    pub fn complete(&self, order: &[usize]) {
        let mut pending = self.pending.lock().unwrap();
        let mut done = self.done.lock().unwrap();
        for &i in order {
            let (tag, op) = pending[i];
            // SAFETY: the device keeps the operation's memory valid until it reaps it.
            done.push((tag, unsafe { super::host_io::run_blocking(op) }));
        }
        let mut keep = 0..;
        pending.retain(|_| !order.contains(&keep.next().unwrap()));
        self.signal.write(1).unwrap();
    }

    /// Completes every waiting operation, last pushed first.
    pub fn complete_reversed(&self) {
        let n = self.pending.lock().unwrap().len();
        self.complete(&(0..n).rev().collect::<Vec<_>>());
    }
}

/// A queue's engine as the device holds it.
struct ManualHandle(Arc<ManualEngine>);

impl IoEngine for ManualHandle {
    unsafe fn push(&mut self, tag: u16, op: HostOp) -> io::Result<()> {
        self.0.pending.lock().unwrap().push((tag, op));
        Ok(())
    }

    fn submit(&mut self) -> io::Result<()> {
        Ok(())
    }

    fn reap(&mut self, out: &mut Vec<(u16, HostResult)>) {
        let _ = self.0.signal.read();
        out.append(&mut self.0.done.lock().unwrap());
    }

    fn completion_fd(&self) -> std::os::unix::io::RawFd {
        self.0.signal.as_raw_fd()
    }

    fn has_completions(&mut self) -> bool {
        !self.0.done.lock().unwrap().is_empty()
    }

    fn name(&self) -> &'static str {
        "manual"
    }
}

/// Makes `dev` run its queues on [`ManualEngine`]s; the handle lists them as they are made
/// (one per queue per activation).
pub fn manual_engines(dev: &mut super::Block) -> Arc<std::sync::Mutex<Vec<Arc<ManualEngine>>>> {
    let made: Arc<std::sync::Mutex<Vec<Arc<ManualEngine>>>> = Arc::default();
    let list = made.clone();
    dev.set_engine_factory(Arc::new(move |_depth| {
        let engine = Arc::new(ManualEngine::new());
        list.lock().unwrap().push(engine.clone());
        Ok(Box::new(ManualHandle(engine)) as Box<dyn IoEngine>)
    }));
    made
}

/// A driver's side of one queue: guest memory, the interrupts the device raises, the queue's
/// notification event.
pub struct Rig {
    /// Guest memory.
    pub memory: GuestMemory,
    /// The device's interrupts.
    pub interrupt: Arc<CountingInterrupt>,
    /// Queue 0's notification event.
    pub notify: Arc<EventFd>,
}

impl Default for Rig {
    fn default() -> Self {
        Self::new()
    }
}

impl Rig {
    /// Fresh memory, no interrupt yet.
    pub fn new() -> Self {
        Rig {
            memory: GuestMemoryAtomic::new(guest_memory()),
            interrupt: Arc::new(CountingInterrupt::default()),
            notify: Arc::new(EventFd::new(EFD_NONBLOCK).unwrap()),
        }
    }

    /// `dev` restored active on `q`'s queue at (next available, next used) = `at`,
    /// failing or not, then resumed.
    pub fn restore(
        &self,
        dev: &mut Block,
        q: &MockSplitQueue<'_, GuestRam>,
        at: (u16, u16),
        failing: bool,
    ) {
        let mut queue: Queue = q.create_queue().unwrap();
        queue.set_next_avail(at.0);
        queue.set_next_used(at.1);
        let aq = ActiveQueue {
            index: 0,
            queue,
            notify: self.notify.clone(),
        };
        let features = dev.features();
        dev.restore_active(
            self.memory.clone(),
            self.interrupt.clone(),
            features,
            vec![aq],
            (failing, false),
        )
        .unwrap();
        assert!(!dev.is_active(), "restored paused");
        dev.resume().unwrap();
    }

    /// Activates `dev` on `queue` as queue 0.
    pub fn activate(&self, dev: &mut Block, queue: Queue) -> Result<(), ActivateError> {
        let aq = ActiveQueue {
            index: 0,
            queue,
            notify: self.notify.clone(),
        };
        dev.activate(
            self.memory.clone(),
            self.interrupt.clone(),
            dev.features(),
            vec![aq],
        )
    }

    /// Queue interrupts raised so far.
    pub fn interrupts(&self) -> usize {
        self.interrupt.queue.load(Ordering::SeqCst)
    }
}
