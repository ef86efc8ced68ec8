//! One virtio-blk request served through the crate's public API: a disk image, guest memory
//! with a split virtqueue written the way a driver writes it (virtio-queue's mock driver side),
//! and a `RequestProcessor` that parses the descriptor chain, reads the sector into the guest's
//! buffer and writes the status byte.
//!
//! Run with `cargo run -p hotplug-vmm-devices --example virtio_blk_request`.

use hotplug_vmm_devices::virtio::GuestRam;
use std::io::Write;
use std::sync::Arc;

use hotplug_vmm_devices::virtio::block::{BlockStats, Disk, RequestProcessor};
use virtio_bindings::bindings::virtio_blk::{
    VIRTIO_BLK_S_OK, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
};
use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::tempfile::TempFile;

const HEADER: u64 = 0x1_0000;
const DATA: u64 = 0x1_1000;
const STATUS: u64 = 0x1_2000;

fn chain_of(header: u64, data: (u64, u32), status: u64) -> [RawDescriptor; 3] {
    let w = VRING_DESC_F_WRITE as u16;
    [
        RawDescriptor::from(Descriptor::new(header, 16, 0, 0)),
        RawDescriptor::from(Descriptor::new(data.0, data.1, w, 0)),
        RawDescriptor::from(Descriptor::new(status, 1, w, 0)),
    ]
}

fn put_header(mem: &GuestRam, request_type: u32, sector: u64) {
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&request_type.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&h, GuestAddress(HEADER)).unwrap();
}

fn main() {
    // A 4-sector image whose sector 2 says hello.
    let image = TempFile::new().unwrap();
    let mut sectors = vec![0u8; 4 * 512];
    sectors[1024..1024 + 19].copy_from_slice(b"hello from sector 2");
    image.as_file().write_all(&sectors).unwrap();

    let mem = GuestRam::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let disk = Arc::new(Disk::open(image.as_path(), true).unwrap());
    let stats = Arc::new(BlockStats::default());
    let mut processor = RequestProcessor::new(disk, "example-disk", 0, 8, stats.clone());

    // VIRTIO_BLK_T_IN of sector 2, 512 bytes.
    let queue = MockSplitQueue::new(&mem, 16);
    put_header(&mem, VIRTIO_BLK_T_IN, 2);
    let chain = queue
        .build_desc_chain(&chain_of(HEADER, (DATA, 512), STATUS))
        .unwrap();
    let used = processor.process(chain);
    let status: u8 = mem.read_obj(GuestAddress(STATUS)).unwrap();
    let mut data = [0u8; 19];
    mem.read_slice(&mut data, GuestAddress(DATA)).unwrap();
    println!(
        "read sector 2: used length {used}, status {status}, data {:?}",
        String::from_utf8_lossy(&data)
    );
    assert_eq!((used, u32::from(status)), (513, VIRTIO_BLK_S_OK));
    assert_eq!(&data, b"hello from sector 2");

    // VIRTIO_BLK_T_GET_ID: the serial.
    let queue = MockSplitQueue::new(&mem, 16);
    put_header(&mem, VIRTIO_BLK_T_GET_ID, 0);
    let chain = queue
        .build_desc_chain(&chain_of(HEADER, (DATA, 20), STATUS))
        .unwrap();
    processor.process(chain);
    let mut id = [0u8; 12];
    mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    println!("serial: {:?}", String::from_utf8_lossy(&id));
    assert_eq!(&id, b"example-disk");

    let s = stats.snapshot();
    println!("stats: {} read(s), {} I/O error(s)", s.reads, s.io_errors);
    assert_eq!((s.reads, s.io_errors), (1, 0));
}
