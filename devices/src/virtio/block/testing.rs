//! Test fixtures: guest memory with a driver-side queue (virtio-queue's mock), descriptors,
//! request headers and disk images.

use std::os::unix::fs::FileExt;
use std::sync::Arc;

use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::tempfile::TempFile;

use super::disk::Disk;
use super::executor::RequestProcessor;
use super::stats::BlockStats;
use crate::virtio::GuestRam;

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
