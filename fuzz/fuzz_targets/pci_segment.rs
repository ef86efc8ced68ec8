//! Fuzzes a PCI segment through both configuration mechanisms — CONFIG_ADDRESS/CONFIG_DATA at
//! 0xCF8 and the ECAM window — with BAR moves applied to a `BarSpace`: a host bridge at 00:00.0,
//! a virtio-pci function at 00:01.0 and a root port at 00:10.0 with another virtio-pci function
//! behind it, the slot's card inserted, pulled out by surprise (its BARs vacated) and removed
//! by the VMM in between, and accesses through the mapped BARs. Besides never panicking or
//! deadlocking, after every step:
//!
//! - CONFIG_ADDRESS reads back what was last written to it (the bits that read back);
//! - the two mechanisms agree on the register CONFIG_ADDRESS selects;
//! - the host bridge's configuration changed only through its masks;
//! - every live BAR mapping is a BAR its function decodes now, at that address and size, and
//!   no two mappings of a space overlap;
//! - the function behind the root port answers exactly while the port's link is up and its
//!   secondary bus is numbered (and not 0), at that bus number.

#![no_main]

use std::sync::{Arc, Mutex};

use devices::interrupt::{MsiMessage, MsiSink};
use devices::pci::{
    BarReprogrammingHandler, BarSpace, Bdf, PciConfigIo, PciConfigMmio, PciHostBridge, PciRoot,
    PcieRootPort, RootPortOptions, SharedPciDevice, VacatedWrites,
};
use devices::virtio::pci::VirtioPciDevice;
use devices::virtio::{GuestMemory, GuestRam};
use hotplug_vmm_fuzz::fake::{FakeDevice, Log, Vectors};
use hotplug_vmm_fuzz::{access_len, check_masked_write, ConfigSnapshot};
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use vm_device::bus::{MmioAddress, PioAddress};
use vm_device::{DeviceMmio, DevicePio};
use vm_memory::{GuestAddress, GuestMemoryAtomic};

const ECAM_BUSES: u16 = 4;
const ROOT_PORT: u8 = 0x10;

struct NoMsi;

impl MsiSink for NoMsi {
    fn send(&self, _message: MsiMessage) -> std::io::Result<()> {
        Ok(())
    }
}

#[derive(Arbitrary, Debug)]
enum Op {
    AddressWrite {
        port: u8,
        len: u8,
        value: u32,
    },
    AddressRead {
        port: u8,
        len: u8,
    },
    /// CONFIG_ADDRESS for a function that exists, register `reg`.
    Select {
        function: u8,
        reg: u8,
    },
    DataRead {
        port: u8,
        len: u8,
    },
    DataWrite {
        port: u8,
        len: u8,
        value: u32,
    },
    EcamRead {
        function: u8,
        bus: u8,
        reg: u16,
        len: u8,
    },
    EcamWrite {
        function: u8,
        bus: u8,
        reg: u16,
        len: u8,
        value: u32,
    },
    /// The guest numbers the port's buses and enables its windows (what its PCI core does).
    NumberBus {
        secondary: u8,
    },
    /// The guest places a function's BAR 0 and enables memory decoding.
    PlaceBar {
        function: u8,
        address: u32,
    },
    BarAccess {
        mapping: u8,
        offset: u16,
        len: u8,
        write: bool,
        value: u64,
    },
    Insert,
    Surprise,
    Remove,
}

#[derive(Arbitrary, Debug)]
struct Input {
    ops: Vec<Op>,
}

struct Segment {
    root: Arc<Mutex<PciRoot>>,
    bars: Arc<BarSpace>,
    cf8: PciConfigIo,
    ecam: PciConfigMmio,
    bridge: Arc<Mutex<PciHostBridge>>,
    port: Arc<Mutex<PcieRootPort>>,
    address: u32,
}

fn virtio(memory: &GuestMemory) -> SharedPciDevice {
    let device = FakeDevice {
        log: Arc::new(Mutex::new(Log::default())),
        max_sizes: vec![64],
        features: 1 << 32,
    };
    let dev = VirtioPciDevice::new(
        Box::new(device),
        memory.clone(),
        Arc::new(Vectors::default()),
    )
    .expect("device");
    Arc::new(Mutex::new(dev))
}

impl Segment {
    fn new() -> Self {
        let ram = GuestRam::from_ranges(&[(GuestAddress(0), 0x1000)]).expect("guest memory");
        let memory: GuestMemory = GuestMemoryAtomic::new(ram);
        let root = Arc::new(Mutex::new(PciRoot::new()));
        let bridge = Arc::new(Mutex::new(PciHostBridge::new()));
        let port = Arc::new(Mutex::new(PcieRootPort::new(
            "rp0",
            1,
            RootPortOptions::default(),
            Arc::new(NoMsi),
        )));
        {
            let mut r = root.lock().unwrap();
            r.add_device(Bdf::new(0, 0, 0).unwrap(), bridge.clone())
                .unwrap();
            r.add_device(Bdf::new(0, 1, 0).unwrap(), virtio(&memory))
                .unwrap();
            let rp = Bdf::new(0, ROOT_PORT, 0).unwrap();
            r.add_device(rp, port.clone()).unwrap();
            r.add_downstream_device(rp, 0, virtio(&memory)).unwrap();
        }
        let bars = Arc::new(BarSpace::new());
        let handler: Arc<dyn BarReprogrammingHandler> = bars.clone();
        Segment {
            cf8: PciConfigIo::new(root.clone(), Some(handler.clone())),
            ecam: PciConfigMmio::new(root.clone(), ECAM_BUSES, Some(handler)),
            root,
            bars,
            bridge,
            port,
            address: 0,
        }
    }

    /// A function's bus, device and function numbers: mostly ones that exist.
    fn bdf(&self, function: u8, bus: u8) -> (u8, u8) {
        match function % 8 {
            0 => (0, 0),
            1 => (0, 1 << 3),
            2 => (0, ROOT_PORT << 3),
            3 | 4 => (self.port.lock().unwrap().secondary_bus(), 0),
            _ => (bus, function),
        }
    }

    fn ecam_offset(&self, function: u8, bus: u8, reg: u16) -> u64 {
        let (bus, devfn) = self.bdf(function, bus);
        (u64::from(bus) << 20) | (u64::from(devfn) << 12) | u64::from(reg % 4096)
    }

    fn ecam_write(&mut self, offset: u64, data: &[u8]) {
        let host = offset >> 12 == 0;
        let reg = (offset & 0xfff) as u16;
        self.checked_write(host, reg, data, |s| s.ecam.write(offset, data));
    }

    /// Runs `write`, a guest write of `data` that reaches register `reg` of the host bridge
    /// when `host`, and checks that the bridge changed only through its masks.
    fn checked_write(&mut self, host: bool, reg: u16, data: &[u8], write: impl FnOnce(&mut Self)) {
        let before = host.then(|| ConfigSnapshot::of(self.bridge.lock().unwrap().config()));
        write(self);
        if let Some(before) = before {
            let after = ConfigSnapshot::of(self.bridge.lock().unwrap().config());
            // Both mechanisms pass an access inside one dword to the function; others go
            // nowhere.
            let data = if usize::from(reg % 4) + data.len() <= 4 {
                data
            } else {
                &[]
            };
            check_masked_write(&before, &after, reg, data, |_| false);
        }
    }

    fn config_write_dword(&mut self, offset: u64, value: u32) {
        self.ecam_write(offset, &value.to_le_bytes());
    }
}

/// Every live mapping is a BAR its function decodes now; mappings do not overlap.
fn check_bars(s: &Segment) {
    let mappings = s.bars.mappings();
    let root = s.root.lock().unwrap();
    let functions: Vec<SharedPciDevice> = root
        .devices()
        .map(|(_, d)| d.clone())
        .chain(root.downstream_devices().map(|(_, _, d)| d.clone()))
        .collect();
    drop(root);
    let decoded: Vec<_> = functions
        .iter()
        .flat_map(|f| f.lock().unwrap().decoded_bars())
        .collect();
    for m in mappings.iter().filter(|m| m.live) {
        let index = m.bar.expect("a live mapping reaches its device");
        assert!(
            decoded.iter().any(|b| b.index == index
                && b.address == m.address
                && b.size == m.size
                && b.kind.is_io() == m.io),
            "stale mapping {m:?}; decoded BARs: {decoded:?}"
        );
    }
    for pair in mappings.windows(2) {
        if pair[0].io == pair[1].io {
            assert!(
                pair[0].address + pair[0].size <= pair[1].address,
                "overlapping mappings {pair:?}"
            );
        }
    }
}

fuzz_target!(|input: Input| {
    let mut s = Segment::new();
    for op in input.ops.iter().take(256) {
        match *op {
            Op::AddressWrite { port, len, value } => {
                let data = &u64::from(value).to_le_bytes()[..access_len(len)];
                let port = u16::from(port % 8);
                s.cf8.write(port, data);
                if port == 0 && data.len() == 4 {
                    s.address = value & 0x8fff_fffc;
                }
            }
            Op::AddressRead { port, len } => {
                let mut data = vec![0u8; access_len(len)];
                s.cf8.read(u16::from(port % 4), &mut data);
            }
            Op::Select { function, reg } => {
                let (bus, devfn) = s.bdf(function, 0);
                let value = 0x8000_0000
                    | u32::from(bus) << 16
                    | u32::from(devfn) << 8
                    | u32::from(reg & 0xfc);
                s.cf8.write(0, &value.to_le_bytes());
                s.address = value;
            }
            Op::DataRead { port, len } => {
                let mut data = vec![0u8; access_len(len)];
                s.cf8.read(4 + u16::from(port % 4), &mut data);
            }
            Op::DataWrite { port, len, value } => {
                let data = &u64::from(value).to_le_bytes()[..access_len(len)];
                let n = u16::from(port % 4);
                let host = s.address & 0x8fff_ff00 == 0x8000_0000;
                let reg = (s.address & 0xfc) as u16 + n;
                s.checked_write(host, reg, data, |s| s.cf8.write(4 + n, data));
            }
            Op::EcamRead {
                function,
                bus,
                reg,
                len,
            } => {
                let mut data = vec![0u8; access_len(len)];
                s.ecam.read(s.ecam_offset(function, bus, reg), &mut data);
            }
            Op::EcamWrite {
                function,
                bus,
                reg,
                len,
                value,
            } => {
                let data = u64::from(value).to_le_bytes();
                let offset = s.ecam_offset(function, bus, reg);
                s.ecam_write(offset, &data[..access_len(len)]);
            }
            Op::NumberBus { secondary } => {
                let rp = u64::from(ROOT_PORT) << 15;
                let buses = u32::from(secondary) << 8 | u32::from(secondary) << 16;
                s.config_write_dword(rp | 0x18, buses);
                s.config_write_dword(rp | 0x20, 0xc010_c000); // memory window
                s.config_write_dword(rp | 0x04, 0x0000_0006); // memory, bus master
            }
            Op::PlaceBar { function, address } => {
                let (bus, devfn): (u8, u8) = if function % 2 == 0 {
                    (0, 1 << 3)
                } else {
                    (s.port.lock().unwrap().secondary_bus(), 0)
                };
                let f = (u64::from(bus) << 20) | (u64::from(devfn) << 12);
                s.config_write_dword(f | 0x04, 0);
                s.config_write_dword(f | 0x10, address & !0xf);
                s.config_write_dword(f | 0x14, 0);
                s.config_write_dword(f | 0x04, 0x0000_0006);
            }
            Op::BarAccess {
                mapping,
                offset,
                len,
                write,
                value,
            } => {
                let mappings = s.bars.mappings();
                if !mappings.is_empty() {
                    let m = mappings[usize::from(mapping) % mappings.len()];
                    let len = access_len(len);
                    let bytes = value.to_le_bytes();
                    let at = m.address + u64::from(offset) % (m.size + 4);
                    match (m.io, write) {
                        (false, false) => s.bars.mmio_read(MmioAddress(at), 0, &mut vec![0; len]),
                        (false, true) => s.bars.mmio_write(MmioAddress(at), 0, &bytes[..len]),
                        (true, false) => {
                            s.bars.pio_read(PioAddress(at as u16), 0, &mut vec![0; len])
                        }
                        (true, true) => s.bars.pio_write(PioAddress(at as u16), 0, &bytes[..len]),
                    }
                }
            }
            Op::Insert => {
                let _ = s.port.lock().unwrap().insert_card();
            }
            Op::Surprise => {
                // What the VMM does: the function leaves the bus, its BARs read zero.
                let rp = Bdf::new(0, ROOT_PORT, 0).unwrap();
                if let Some(dev) = s.root.lock().unwrap().remove_downstream_device(rp, 0) {
                    s.bars.vacate_device(&dev, VacatedWrites::Dropped);
                }
                let _ = s.port.lock().unwrap().surprise_remove();
            }
            Op::Remove => {
                let rp = Bdf::new(0, ROOT_PORT, 0).unwrap();
                if let Some(dev) = s.root.lock().unwrap().remove_downstream_device(rp, 0) {
                    s.bars.unmap_device(&dev);
                }
                let _ = s.port.lock().unwrap().remove_card();
            }
        }

        // CONFIG_ADDRESS reads back.
        let mut address = [0u8; 4];
        s.cf8.read(0, &mut address);
        assert_eq!(u32::from_le_bytes(address), s.address);
        // Both mechanisms reach the same register.
        if s.address & 0x8f00_0000 == 0x8000_0000 && (s.address >> 16) as u16 & 0xff < ECAM_BUSES {
            let mut via_cf8 = [0u8; 4];
            s.cf8.read(4, &mut via_cf8);
            let mut via_ecam = [0u8; 4];
            let offset = u64::from((s.address >> 8) & 0xffff) << 12 | u64::from(s.address & 0xfc);
            s.ecam.read(offset, &mut via_ecam);
            assert_eq!(via_cf8, via_ecam, "CONFIG_ADDRESS {:#x}", s.address);
        }
        check_bars(&s);
        // The function behind the port answers only where the port forwards.
        let (secondary, link) = {
            let p = s.port.lock().unwrap();
            (p.secondary_bus(), p.slot().is_link_active())
        };
        let present = s
            .root
            .lock()
            .unwrap()
            .downstream_device(Bdf::new(0, ROOT_PORT, 0).unwrap(), 0)
            .is_some();
        for bus in 1..ECAM_BUSES as u8 {
            let mut vendor = [0u8; 2];
            s.ecam.read(u64::from(bus) << 20, &mut vendor);
            let answers = vendor != [0xff, 0xff];
            assert_eq!(
                answers,
                present && link && bus == secondary,
                "bus {bus}: secondary {secondary}, link {link}, present {present}"
            );
        }
    }
});
