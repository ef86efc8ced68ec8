//! Fuzzes the snapshot and migration stream reader (docs/snapshot-format.md): the fuzzer's
//! bytes are a snapshot file or a migration stream, read as the destination reads one — the
//! header, each record's checksum, the machine (CONF), memory runs written into a small guest
//! memory, JSON records. A malformed stream must be refused, never panic, hang, allocate
//! without bound or write outside guest memory.
//!
//! The reader is the VMM's own source, compiled in here (the VMM is a binary crate).

#![no_main]

use devices::virtio::GuestRam;
use libfuzzer_sys::fuzz_target;
use vm_memory::GuestAddress;

#[allow(dead_code)]
#[path = "../../vmm/src/migration/compat.rs"]
mod compat;
#[allow(dead_code)]
#[path = "../../vmm/src/migration/memory.rs"]
mod memory;
#[allow(dead_code)]
#[path = "../../vmm/src/migration/stream.rs"]
mod stream;

use crate::stream::{tag, StreamReader};

/// At most this many records per input: a stream of empty records must not run for long.
const MAX_RECORDS: usize = 256;

fuzz_target!(|data: &[u8]| {
    // 64 KiB at 0 and 8 KiB after a hole: runs may start, end or straddle outside RAM.
    let memory = GuestRam::from_ranges(&[
        (GuestAddress(0), 0x1_0000),
        (GuestAddress(0x2_0000), 0x2000),
    ])
    .expect("guest memory");
    let Ok(mut input) = StreamReader::new(data) else {
        return;
    };
    for _ in 0..MAX_RECORDS {
        let Ok(record) = input.next_record() else {
            return;
        };
        match record.tag {
            tag::MEMR => {
                if crate::memory::receive_run(&memory, &mut input, &record).is_err() {
                    return;
                }
            }
            tag::DONE => {
                let _ = input.end(&record);
                return;
            }
            tag::CONF => match input.json_payload(&record) {
                Ok(bytes) => {
                    if let Ok(source) =
                        serde_json::from_slice::<crate::compat::MachineConfig>(&bytes)
                    {
                        let _ = crate::compat::check(&source, &source);
                    }
                }
                Err(_) => return,
            },
            _ => {
                if input.json_payload(&record).is_err() {
                    return;
                }
            }
        }
    }
});
