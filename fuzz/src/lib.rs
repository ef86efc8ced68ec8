//! What the fuzz targets share: configuration space as the guest last saw it, and the rule a
//! guest write must follow through the writable and write-1-to-clear masks.

use devices::pci::configuration::{PciConfiguration, CONFIG_SPACE_SIZE};

/// Configuration space with its masks, byte by byte.
#[derive(Clone)]
pub struct ConfigSnapshot {
    /// What each byte reads.
    pub bytes: Vec<u8>,
    /// The bits a guest write replaces.
    pub writable: Vec<u8>,
    /// The bits a guest write clears where it writes a 1.
    pub w1c: Vec<u8>,
}

impl ConfigSnapshot {
    /// `config` now.
    pub fn of(config: &PciConfiguration) -> Self {
        let offsets = 0..CONFIG_SPACE_SIZE as u16;
        let snapshot = ConfigSnapshot {
            bytes: offsets.clone().map(|o| config.read_u8(o)).collect(),
            writable: offsets.clone().map(|o| config.writable_bits(o)).collect(),
            w1c: offsets.map(|o| config.w1c_bits(o)).collect(),
        };
        for (o, (w, c)) in snapshot.writable.iter().zip(&snapshot.w1c).enumerate() {
            assert_eq!(w & c, 0, "byte {o:#x}: bits both writable and RW1C");
        }
        snapshot
    }

    /// The byte at `offset` after a guest wrote `value` there through the masks.
    pub fn written(&self, offset: usize, value: u8) -> u8 {
        let (old, writable, w1c) = (self.bytes[offset], self.writable[offset], self.w1c[offset]);
        (old & !writable & !w1c) | (value & writable) | (old & w1c & !value)
    }
}

/// Checks that a guest write of `data` at `offset` took `before` to `after` through the masks:
/// the bytes written follow [`ConfigSnapshot::written`] (if the write fits the space: one that
/// does not is ignored whole), every other byte is unchanged. Bytes for which `owned` is true are
/// the device model's (registers it rewrites as a consequence of the write) and not checked.
pub fn check_masked_write(
    before: &ConfigSnapshot,
    after: &ConfigSnapshot,
    offset: u16,
    data: &[u8],
    owned: impl Fn(usize) -> bool,
) {
    let start = usize::from(offset);
    let fits = !data.is_empty() && start + data.len() <= CONFIG_SPACE_SIZE;
    for o in (0..CONFIG_SPACE_SIZE).filter(|&o| !owned(o)) {
        let want = match o.checked_sub(start).and_then(|i| data.get(i)) {
            Some(&value) if fits => before.written(o, value),
            _ => before.bytes[o],
        };
        assert_eq!(
            after.bytes[o], want,
            "byte {o:#x} after writing {data:02x?} at {offset:#x}: was {:#04x}, writable {:#04x}, RW1C {:#04x}",
            before.bytes[o], before.writable[o], before.w1c[o]
        );
    }
    assert_eq!(
        before.writable, after.writable,
        "a guest write changed the masks"
    );
    assert_eq!(before.w1c, after.w1c, "a guest write changed the masks");
}

/// An access length from a fuzzer's byte: mostly 1, 2, 4, sometimes 0, 3 or 8.
pub fn access_len(b: u8) -> usize {
    match b % 8 {
        0 => 0,
        1 | 5 => 1,
        2 | 6 => 2,
        3 => 3,
        4 | 7 => 4,
        _ => unreachable!(),
    }
    .max(if b >= 0xf0 { 8 } else { 0 })
}

pub mod fake {
    //! A virtio device that serves nothing and records what the transport asks of it, and an
    //! MSI-X group that counts: the transport is what the targets fuzz.

    use std::sync::{Arc, Mutex};

    use devices::interrupt::{MsiInterruptGroup, MsiMessage};
    use devices::virtio::pci::VIRTIO_ID_BLOCK;
    use devices::virtio::{ActivateError, ActiveQueue, GuestMemory, VirtioDevice, VirtioInterrupt};

    /// What the transport did to a [`FakeDevice`].
    #[derive(Default, Debug)]
    pub struct Log {
        /// Activations since creation.
        pub activations: usize,
        /// Resets (and shutdowns) since creation.
        pub resets: usize,
        /// Between an activation and the next reset.
        pub active: bool,
        /// What `needs_reset` answers (set by the target).
        pub needs_reset: bool,
    }

    /// See the module documentation. Its configuration space is 8 read-only bytes.
    pub struct FakeDevice {
        /// Shared with the target.
        pub log: Arc<Mutex<Log>>,
        /// The queues' maximum sizes.
        pub max_sizes: Vec<u16>,
        /// The features offered.
        pub features: u64,
    }

    /// The device's configuration bytes.
    pub const CONFIG: [u8; 8] = [0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, 0x18];

    impl VirtioDevice for FakeDevice {
        fn device_type(&self) -> u32 {
            VIRTIO_ID_BLOCK
        }
        fn id(&self) -> &str {
            "fake"
        }
        fn queue_max_sizes(&self) -> Vec<u16> {
            self.max_sizes.clone()
        }
        fn features(&self) -> u64 {
            self.features
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            for (i, b) in data.iter_mut().enumerate() {
                *b = offset
                    .checked_add(i as u64)
                    .and_then(|o| usize::try_from(o).ok())
                    .and_then(|o| CONFIG.get(o).copied())
                    .unwrap_or(0);
            }
        }
        fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
        fn activate(
            &mut self,
            _memory: GuestMemory,
            _interrupt: Arc<dyn VirtioInterrupt>,
            _features: u64,
            _queues: Vec<ActiveQueue>,
        ) -> Result<(), ActivateError> {
            let mut log = self.log.lock().unwrap();
            assert!(!log.active, "activated twice without a reset");
            log.active = true;
            log.activations += 1;
            Ok(())
        }
        fn reset(&mut self) {
            let mut log = self.log.lock().unwrap();
            log.active = false;
            log.needs_reset = false;
            log.resets += 1;
        }
        fn needs_reset(&self) -> bool {
            self.log.lock().unwrap().needs_reset
        }
    }

    /// Counts what the transport asks of the hypervisor's MSI-X routes.
    #[derive(Default)]
    pub struct Vectors {
        /// Messages sent.
        pub triggered: Mutex<Vec<u16>>,
    }

    impl MsiInterruptGroup for Vectors {
        fn update(
            &self,
            _vector: u16,
            _message: MsiMessage,
            _enabled: bool,
        ) -> std::io::Result<()> {
            Ok(())
        }
        fn trigger(&self, vector: u16) -> std::io::Result<()> {
            self.triggered.lock().unwrap().push(vector);
            Ok(())
        }
    }
}
