//! Fuzzes the virtio-pci transport: arbitrary guest accesses to BAR 0 (common configuration,
//! notify, ISR, device configuration, MSI-X table and PBA, reserved space and past the end) and
//! to configuration space (BARs, MSI-X control, the `VIRTIO_PCI_CAP_PCI_CFG` window), with a
//! well-formed driver initialisation and the VMM's operations (reset, needs-reset, surprise
//! removal, pause and resume) interleaved, over a device that serves nothing. Besides never
//! panicking, after every step:
//!
//! - device status only gains bits until a reset clears it, DRIVER_OK never stands without
//!   FEATURES_OK or with FAILED, and the device is activated once per DRIVER_OK, never twice
//!   without a reset;
//! - configuration writes follow the writable and RW1C masks (the window's data bytes aside,
//!   which the transport fills);
//! - guest writes never change the MSI-X Pending Bit Array, and accesses past BAR 0 read
//!   all-ones;
//! - at the end, a snapshot of the function restores into a new one that the guest cannot tell
//!   from it (configuration space, common configuration of every queue, device configuration,
//!   MSI-X table and PBA read the same).

#![no_main]

use std::sync::{Arc, Mutex};

use devices::pci::PciDevice;
use devices::virtio::pci::*;
use devices::virtio::{status, GuestMemory, GuestRam, InFlightPolicy};
use hotplug_vmm_fuzz::fake::{FakeDevice, Log, Vectors};
use hotplug_vmm_fuzz::{access_len, check_masked_write, ConfigSnapshot};
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use vm_memory::{GuestAddress, GuestMemoryAtomic};

const RAM: usize = 0x1_0000;
const VERSION_1: u64 = 1 << 32;
const EVENT_IDX: u64 = 1 << 29;
const FEATURES: u64 = VERSION_1 | EVENT_IDX | (1 << 9);
const PCI_CFG_TYPE: u8 = 5;

#[derive(Arbitrary, Debug)]
enum Op {
    BarRead {
        offset: u16,
        len: u8,
    },
    BarWrite {
        offset: u16,
        len: u8,
        value: u64,
    },
    ConfigRead {
        offset: u16,
        len: u8,
    },
    ConfigWrite {
        offset: u16,
        len: u8,
        value: u64,
    },
    /// What a driver does, well formed, up to DRIVER_OK (queues at `rings` in guest memory).
    Init {
        queues: u8,
        rings: u16,
    },
    NeedsReset,
    Reset,
    Surprise {
        fail: bool,
    },
    Pause,
    Resume,
}

#[derive(Arbitrary, Debug)]
struct Input {
    queue_sizes: Vec<u16>,
    ops: Vec<Op>,
}

/// BAR 0 offsets near the regions more often than a uniform u16 would give them.
fn bar_offset(raw: u16) -> u64 {
    let within = u64::from(raw & 0x1fff);
    match raw >> 13 {
        0 | 1 => COMMON_CFG_OFFSET + within % 0x40,
        2 => ISR_CFG_OFFSET + within % 4,
        3 => DEVICE_CFG_OFFSET + within % 0x10,
        4 => NOTIFY_CFG_OFFSET + within % 0x40,
        5 => MSIX_TABLE_OFFSET + within % 0x100,
        6 => MSIX_PBA_OFFSET + within % 0x10,
        _ => u64::from(raw) * 2,
    }
}

fn new_device(sizes: &[u16], memory: &GuestMemory) -> (VirtioPciDevice, Arc<Mutex<Log>>) {
    let log = Arc::new(Mutex::new(Log::default()));
    let device = FakeDevice {
        log: log.clone(),
        max_sizes: sizes.to_vec(),
        features: FEATURES,
    };
    let vectors = Arc::new(Vectors::default());
    let dev = VirtioPciDevice::new(Box::new(device), memory.clone(), vectors).expect("device");
    (dev, log)
}

/// The configuration-space bytes of the `VIRTIO_PCI_CAP_PCI_CFG` window's data, which the
/// transport fills on reads through it.
fn window_data(dev: &VirtioPciDevice) -> std::ops::Range<usize> {
    let config = dev.config();
    let mut cap = config.read_u8(0x34) & !3;
    for _ in 0..48 {
        if cap == 0 {
            break;
        }
        let at = u16::from(cap);
        if config.read_u8(at) == 0x09 && config.read_u8(at + VIRTIO_CAP_CFG_TYPE) == PCI_CFG_TYPE {
            let data = usize::from(at + VIRTIO_PCI_CFG_CAP_DATA);
            return data..data + 4;
        }
        cap = config.read_u8(at + 1) & !3;
    }
    panic!("no PCI_CFG capability");
}

fn bar_write(dev: &mut VirtioPciDevice, offset: u64, value: u64, len: usize) {
    dev.bar_write(VIRTIO_BAR, offset, &value.to_le_bytes()[..len]);
}

fn bar_read(dev: &mut VirtioPciDevice, offset: u64, len: usize) -> u64 {
    let mut b = [0u8; 8];
    dev.bar_read(VIRTIO_BAR, offset, &mut b[..len]);
    u64::from_le_bytes(b)
}

fn init(dev: &mut VirtioPciDevice, queues: u8, rings: u16) {
    let c = COMMON_CFG_OFFSET;
    bar_write(dev, c + COMMON_DEVICE_STATUS, 0, 1);
    bar_write(
        dev,
        c + COMMON_DEVICE_STATUS,
        u64::from(status::ACKNOWLEDGE | status::DRIVER),
        1,
    );
    for select in 0..2 {
        bar_write(dev, c + COMMON_DEVICE_FEATURE_SELECT, select, 4);
        let offered = bar_read(dev, c + COMMON_DEVICE_FEATURE, 4);
        bar_write(dev, c + COMMON_DRIVER_FEATURE_SELECT, select, 4);
        bar_write(dev, c + COMMON_DRIVER_FEATURE, offered, 4);
    }
    let s = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
    bar_write(dev, c + COMMON_DEVICE_STATUS, u64::from(s), 1);
    let count = bar_read(dev, c + COMMON_NUM_QUEUES, 2);
    for q in 0..u64::from(queues).min(count) {
        bar_write(dev, c + COMMON_QUEUE_SELECT, q, 2);
        bar_write(dev, c + COMMON_QUEUE_SIZE, 16, 2);
        let base = u64::from(rings) % (RAM as u64) & !0xf;
        bar_write(dev, c + COMMON_QUEUE_DESC, base, 8);
        bar_write(dev, c + COMMON_QUEUE_DRIVER, base + 0x100, 8);
        bar_write(dev, c + COMMON_QUEUE_DEVICE, base + 0x200, 8);
        bar_write(dev, c + COMMON_QUEUE_MSIX_VECTOR, q, 2);
        bar_write(dev, c + COMMON_QUEUE_ENABLE, 1, 2);
    }
    bar_write(
        dev,
        c + COMMON_DEVICE_STATUS,
        u64::from(s | status::DRIVER_OK),
        1,
    );
}

/// Everything the guest can read of `dev` without side effects on what it reads next (the ISR
/// is left out: reading it clears it). Changes the selectors.
fn visible(dev: &mut VirtioPciDevice) -> Vec<u64> {
    let mut out: Vec<u64> = (0..4096u16)
        .map(|o| u64::from(dev.config().read_u8(o)))
        .collect();
    let c = COMMON_CFG_OFFSET;
    let fields: [(u64, usize); 17] = [
        (COMMON_DEVICE_FEATURE_SELECT, 4),
        (COMMON_DEVICE_FEATURE, 4),
        (COMMON_DRIVER_FEATURE_SELECT, 4),
        (COMMON_DRIVER_FEATURE, 4),
        (COMMON_CONFIG_MSIX_VECTOR, 2),
        (COMMON_NUM_QUEUES, 2),
        (COMMON_DEVICE_STATUS, 1),
        (COMMON_CONFIG_GENERATION, 1),
        (COMMON_QUEUE_SELECT, 2),
        (COMMON_QUEUE_SIZE, 2),
        (COMMON_QUEUE_MSIX_VECTOR, 2),
        (COMMON_QUEUE_ENABLE, 2),
        (COMMON_QUEUE_NOTIFY_OFF, 2),
        (COMMON_QUEUE_DESC, 8),
        (COMMON_QUEUE_DRIVER, 8),
        (COMMON_QUEUE_DEVICE, 8),
        (COMMON_QUEUE_DESC, 4),
    ];
    let queues = bar_read(dev, c + COMMON_NUM_QUEUES, 2);
    for q in 0..queues {
        bar_write(dev, c + COMMON_QUEUE_SELECT, q, 2);
        for select in 0..2 {
            bar_write(dev, c + COMMON_DEVICE_FEATURE_SELECT, select, 4);
            bar_write(dev, c + COMMON_DRIVER_FEATURE_SELECT, select, 4);
            let mut values: Vec<u64> = fields
                .iter()
                .map(|&(f, len)| bar_read(dev, c + f, len))
                .collect();
            // driver_feature: a device presents the valid bits the driver wrote and MAY
            // present the others (Virtio 1.2 §4.1.4.3.2); a restore keeps only the valid ones.
            values[3] &= values[1];
            out.extend(values);
        }
    }
    out.extend((0..8).map(|o| bar_read(dev, DEVICE_CFG_OFFSET + o, 1)));
    let table = u64::from(dev.msix_vectors()) * 16;
    out.extend((0..table / 4).map(|i| bar_read(dev, MSIX_TABLE_OFFSET + 4 * i, 4)));
    out.extend((0..8).map(|i| bar_read(dev, MSIX_PBA_OFFSET + 8 * i, 8)));
    out
}

fuzz_target!(|input: Input| {
    let mut sizes: Vec<u16> = input.queue_sizes.iter().copied().take(4).collect();
    if sizes.is_empty() {
        sizes.push(256);
    }
    let ram = GuestRam::from_ranges(&[(GuestAddress(0), RAM)]).expect("guest memory");
    let memory: GuestMemory = GuestMemoryAtomic::new(ram);
    let (mut dev, log) = new_device(&sizes, &memory);
    let window = window_data(&dev);
    let pba = |dev: &mut VirtioPciDevice| -> Vec<u64> {
        (0..8)
            .map(|i| bar_read(dev, MSIX_PBA_OFFSET + 8 * i, 8))
            .collect()
    };

    for op in input.ops.iter().take(256) {
        let status_before = dev.status() & !status::DEVICE_NEEDS_RESET;
        let activations_before = log.lock().unwrap().activations;
        match *op {
            Op::BarRead { offset, len } => {
                let offset = bar_offset(offset);
                let mut data = vec![0u8; access_len(len)];
                dev.bar_read(VIRTIO_BAR, offset, &mut data);
                if offset >= BAR0_SIZE {
                    assert!(
                        data.iter().all(|&b| b == 0xff),
                        "past BAR 0 at {offset:#x}: {data:02x?}"
                    );
                }
                let mut other = vec![0u8; 4];
                dev.bar_read(1, offset, &mut other);
                assert_eq!(other, [0xff; 4], "BAR 1 does not exist");
            }
            Op::BarWrite { offset, len, value } => {
                let offset = bar_offset(offset);
                let pba_before = pba(&mut dev);
                bar_write(&mut dev, offset, value, access_len(len));
                assert_eq!(pba(&mut dev), pba_before, "a guest write changed the PBA");
            }
            Op::ConfigRead { offset, len } => {
                let mut data = vec![0u8; access_len(len)];
                dev.config_read(offset % 0x1100, &mut data);
            }
            Op::ConfigWrite { offset, len, value } => {
                let offset = offset % 0x1100;
                let data = &value.to_le_bytes()[..access_len(len)];
                let before = ConfigSnapshot::of(dev.config());
                let _ = dev.config_write(offset, data);
                let after = ConfigSnapshot::of(dev.config());
                check_masked_write(&before, &after, offset, data, |o| window.contains(&o));
            }
            Op::Init { queues, rings } => init(&mut dev, queues % 5, rings),
            Op::NeedsReset => log.lock().unwrap().needs_reset = true,
            Op::Reset => dev.reset(),
            Op::Surprise { fail } => {
                let policy = if fail {
                    InFlightPolicy::Fail
                } else {
                    InFlightPolicy::Drop
                };
                dev.surprise_remove(policy);
            }
            Op::Pause => dev.pause(),
            Op::Resume => dev.resume(),
        }
        let now = dev.status();
        let status_after = now & !status::DEVICE_NEEDS_RESET;
        // (Init writes 0 first: a reset.)
        assert!(
            status_after == 0
                || status_after & status_before == status_before
                || matches!(op, Op::Init { .. }),
            "status went from {status_before:#x} to {status_after:#x} without a reset ({op:?})"
        );
        if status_after & status::DRIVER_OK != 0 {
            assert_ne!(
                status_after & status::FEATURES_OK,
                0,
                "DRIVER_OK without FEATURES_OK"
            );
            if status_before & status::DRIVER_OK == 0 {
                assert_eq!(status_after & status::FAILED, 0, "DRIVER_OK with FAILED");
            }
        }
        let (activations, device_active) = {
            let log = log.lock().unwrap();
            (log.activations, log.active)
        };
        let activated = activations - activations_before;
        assert!(activated <= 1, "activated {activated} times by {op:?}");
        // (Init resets the device first: its DRIVER_OK is new even when the status was.)
        if activated == 1 && !matches!(op, Op::Resume | Op::Pause | Op::Init { .. }) {
            assert!(
                status_after & status::DRIVER_OK != 0 && status_before & status::DRIVER_OK == 0,
                "activated without a new DRIVER_OK ({op:?}: {status_before:#x} -> {status_after:#x})"
            );
        }
        if dev.is_activated() {
            assert!(device_active, "the transport is active, the device is not");
        }
    }

    // A snapshot restores into a function the guest cannot tell apart.
    dev.pause();
    if dev.is_failing() || log.lock().unwrap().needs_reset {
        return; // the fake device, unlike virtio-blk, cannot be restored failing
    }
    let Ok(state) = dev.state() else {
        return;
    };
    let (mut restored, _) = new_device(&sizes, &memory);
    if restored.restore(&state).is_err() {
        panic!("a function's own snapshot does not restore");
    }
    assert_eq!(
        visible(&mut restored),
        visible(&mut dev),
        "restored function differs"
    );
});
