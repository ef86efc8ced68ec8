//! The virtio-blk data path allocates nothing per request once warmed up: every heap
//! allocation of the process is counted (a counting global allocator) while 3,200 reads are
//! served at depth 32, on each engine. The only test of its binary, so that nothing else
//! allocates meanwhile.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hotplug_vmm_devices::virtio::block::{AioBackend, Block, BlockConfig};
use hotplug_vmm_devices::virtio::{
    ActiveQueue, GuestRam, VirtioDevice, VirtioInterrupt, VirtioInterruptType,
};
use virtio_bindings::bindings::virtio_blk::VIRTIO_BLK_T_IN;
use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::tempfile::TempFile;

struct Counting;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator, counting.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: the caller's layout, forwarded.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` came from `System.alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: forwarded.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

struct NoInterrupt;

impl VirtioInterrupt for NoInterrupt {
    fn trigger(&self, _: VirtioInterruptType) -> std::io::Result<()> {
        Ok(())
    }
}

const QUEUE_SIZE: u16 = 256;
const DEPTH: u16 = 32;
const HEADERS: u64 = 0x10_0000;
const STATUS: u64 = 0x11_0000;
const DATA: u64 = 0x12_0000;

/// Allocations made while `rounds` rounds of `DEPTH` reads are served on `aio`, after a
/// warm-up.
fn allocations_while_serving(aio: AioBackend, rounds: u32) -> usize {
    let image = TempFile::new().unwrap();
    image.as_file().set_len(1 << 20).unwrap();
    let mem = GuestRam::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
    let memory = GuestMemoryAtomic::new(mem);
    let guard = memory.memory();
    let q = MockSplitQueue::new(&*guard, QUEUE_SIZE);
    // DEPTH reads of 4 KiB, three descriptors each, made available once; each round makes the
    // same chains available again.
    for i in 0..DEPTH {
        let header = HEADERS + 16 * u64::from(i);
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
        h[8..16].copy_from_slice(&(8 * u64::from(i)).to_le_bytes());
        guard.write_slice(&h, GuestAddress(header)).unwrap();
        let at = 3 * i;
        let next = VRING_DESC_F_NEXT as u16;
        let write = VRING_DESC_F_WRITE as u16;
        let chain = [
            RawDescriptor::from(Descriptor::new(header, 16, next, at + 1)),
            RawDescriptor::from(Descriptor::new(
                DATA + 4096 * u64::from(i),
                4096,
                write | next,
                at + 2,
            )),
            RawDescriptor::from(Descriptor::new(STATUS + u64::from(i), 1, write, 0)),
        ];
        q.add_desc_chains(&chain, at).unwrap();
    }
    let notify = Arc::new(EventFd::new(EFD_NONBLOCK).unwrap());
    let mut config = BlockConfig::new(image.as_path(), "alloc");
    config.aio = aio;
    config.queue_size = QUEUE_SIZE;
    let mut dev = Block::new(config).unwrap();
    let features = dev.features();
    let queue: Queue = q.create_queue().unwrap();
    let active = ActiveQueue {
        index: 0,
        queue,
        notify: notify.clone(),
    };
    dev.activate(
        memory.clone(),
        Arc::new(NoInterrupt),
        features,
        vec![active],
    )
    .unwrap();

    let mut served: u16 = 0;
    let wait_used = |target: u16| {
        let deadline = Instant::now() + Duration::from_secs(20);
        while q.used().idx().load() != target {
            assert!(Instant::now() < deadline, "requests not served");
            std::thread::sleep(Duration::from_micros(50));
        }
    };
    wait_used(DEPTH);
    served = served.wrapping_add(DEPTH);
    let round = |served: &mut u16| {
        let avail = q.avail().idx().load();
        for i in 0..DEPTH {
            let slot = usize::from(avail.wrapping_add(i) % QUEUE_SIZE);
            q.avail().ring().ref_at(slot).unwrap().store(3 * i);
        }
        q.avail().idx().store(avail.wrapping_add(DEPTH));
        notify.write(1).unwrap();
        *served = served.wrapping_add(DEPTH);
        wait_used(*served);
    };
    for _ in 0..20 {
        round(&mut served);
    }
    let before = ALLOCATIONS.load(Ordering::SeqCst);
    for _ in 0..rounds {
        round(&mut served);
    }
    let made = ALLOCATIONS.load(Ordering::SeqCst) - before;
    let status: u8 = guard.read_obj(GuestAddress(STATUS)).unwrap();
    assert_eq!(status, 0, "{aio:?}: requests served");
    dev.reset();
    made
}

#[test]
fn serving_requests_allocates_nothing() {
    for aio in [AioBackend::IoUring, AioBackend::Threads] {
        let made = allocations_while_serving(aio, 100);
        assert_eq!(
            made, 0,
            "{aio:?}: {made} allocations while serving 3,200 requests"
        );
    }
}
