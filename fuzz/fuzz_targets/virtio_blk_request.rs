//! Fuzzes virtio-blk request parsing and execution: the fuzzer's bytes become guest memory
//! (descriptor table, available ring, headers, buffers) and the device serves whatever chains
//! they describe against a small temporary disk image. It must never panic or hang.

#![no_main]

use std::sync::{Arc, OnceLock};

use devices::virtio::block::{BlockStats, Disk, RequestProcessor};
use devices::virtio::GuestRam;
use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::tempfile::TempFile;

/// Guest RAM: 64 KiB at 0 and 4 KiB after a hole, so that buffers can straddle regions and gaps.
const RAM: u64 = 0x1_0000;
const HIGH: u64 = 0x2_0000;
const HIGH_SIZE: u64 = 0x1000;
const QUEUE_SIZE: u16 = 16;
const DESC_TABLE: u64 = 0;
const AVAIL_RING: u64 = 0x100;
const USED_RING: u64 = 0x200;
/// Disk image: 128 sectors.
const DISK_BYTES: usize = 128 * 512;
/// Upper bound on the chains served per input.
const MAX_CHAINS: usize = 64;

struct Fixture {
    _image: TempFile,
    rw: Arc<Disk>,
    ro: Arc<Disk>,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let image = TempFile::new().expect("temp file");
        image.as_file().set_len(DISK_BYTES as u64).expect("set_len");
        let rw = Arc::new(Disk::open(image.as_path(), false).expect("open rw"));
        let ro = Arc::new(Disk::open(image.as_path(), true).expect("open ro"));
        Fixture {
            _image: image,
            rw,
            ro,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&[flags, seg_max, features], memory)) = data.split_first_chunk::<3>() else {
        return;
    };
    let fx = fixture();
    let mem = GuestRam::from_ranges(&[
        (GuestAddress(0), RAM as usize),
        (GuestAddress(HIGH), HIGH_SIZE as usize),
    ])
    .expect("guest memory");
    let n = memory.len().min(RAM as usize);
    mem.write_slice(&memory[..n], GuestAddress(0))
        .expect("fill");
    if memory.len() > n {
        let m = (memory.len() - n).min(HIGH_SIZE as usize);
        mem.write_slice(&memory[n..n + m], GuestAddress(HIGH))
            .expect("fill high");
    }

    let mut queue = Queue::new(QUEUE_SIZE).expect("queue");
    queue.set_size(QUEUE_SIZE);
    queue.set_desc_table_address(Some(DESC_TABLE as u32), Some(0));
    queue.set_avail_ring_address(Some(AVAIL_RING as u32), Some(0));
    queue.set_used_ring_address(Some(USED_RING as u32), Some(0));
    queue.set_event_idx(flags & 1 != 0);
    queue.set_ready(true);

    let disk = if flags & 2 != 0 { &fx.ro } else { &fx.rw };
    // Feature byte: bit 0 DISCARD (13), bit 1 WRITE_ZEROES (14).
    let negotiated = (u64::from(features & 3)) << 13;
    let mut processor = RequestProcessor::new(
        disk.clone(),
        "fuzz-serial",
        negotiated,
        u32::from(seg_max),
        Arc::new(BlockStats::default()),
    );
    for _ in 0..MAX_CHAINS {
        let chain = match queue.iter(&mem) {
            Ok(mut it) => match it.next() {
                Some(chain) => chain,
                None => break,
            },
            Err(_) => break,
        };
        let head = chain.head_index();
        let used = processor.process(chain);
        if queue.add_used(&mem, head, used).is_err() {
            break;
        }
    }
    let _ = queue.needs_notification(&mem);
});
