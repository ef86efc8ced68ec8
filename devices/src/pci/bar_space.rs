//! The address space of BARs: where each decoded BAR of every function is mapped, as one region
//! on a VMM's bus that dispatches accesses to the BAR under them.
//!
//! Guests move BARs with configuration writes, and those writes are themselves dispatched by the
//! VMM's bus, which typically holds that bus shared while dispatching. Keeping BAR mappings in a
//! [`BarSpace`] of their own — registered once on the VMM's bus over the host bridge's windows —
//! lets a configuration write remap BARs without exclusive access to the VMM's bus. A
//! [`BarSpace`] is also a [`BarReprogrammingHandler`] that applies every [`BarReprogram`].

use std::collections::BTreeMap;
use std::sync::RwLock;

use vm_device::bus::{MmioAddress, MmioAddressOffset, PioAddress, PioAddressOffset};
use vm_device::{DeviceMmio, DevicePio};

use super::bus::{BarReprogrammingHandler, Bdf};
use super::configuration::{BarKind, BarReprogram};
use super::device::{same_device, PciBarIo, SharedPciDevice};

#[derive(Clone)]
struct Mapping {
    size: u64,
    bdf: Bdf,
    target: Target,
}

/// What a mapping dispatches to.
#[derive(Clone)]
enum Target {
    /// The BAR of a device on the bus.
    Live(PciBarIo),
    /// A vacated BAR (see [`BarSpace::vacate_device`]): reads zero; writes go to the device
    /// if it is given, are dropped otherwise.
    Vacated(Option<PciBarIo>),
}

impl Target {
    /// The device that `self` reaches, if any.
    fn device(&self) -> Option<&PciBarIo> {
        match self {
            Target::Live(r) | Target::Vacated(Some(r)) => Some(r),
            Target::Vacated(None) => None,
        }
    }

    fn is_live(&self) -> bool {
        matches!(self, Target::Live(_))
    }
}

/// What the vacated BARs of a device pulled out do with writes
/// ([`BarSpace::vacate_device`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VacatedWrites {
    /// Dropped, as reads are answered: without the device.
    Dropped,
    /// Passed to the device, which knows it is gone: for a device that still has something
    /// to learn from its driver (a virtio device that goes on failing requests until the
    /// driver resets it). The mapping holds the device until it is vacated again with
    /// [`VacatedWrites::Dropped`], unmapped with [`BarSpace::unmap_device`], or evicted.
    ToDevice,
}

#[derive(Default)]
struct Maps {
    memory: BTreeMap<u64, Mapping>,
    io: BTreeMap<u64, Mapping>,
}

/// A vacated mapping that no longer reaches a device (see [`BarSpace::vacated`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VacatedRegion {
    /// An I/O BAR (else memory).
    pub io: bool,
    /// Where it starts.
    pub address: u64,
    /// Its size.
    pub size: u64,
    /// The function it belonged to.
    pub bdf: Bdf,
}

/// One mapping of a [`BarSpace`], as [`BarSpace::mappings`] lists it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarMapping {
    /// In I/O port space (else memory).
    pub io: bool,
    /// Where it starts.
    pub address: u64,
    /// Its size.
    pub size: u64,
    /// The function it was mapped for.
    pub bdf: Bdf,
    /// The BAR it reaches, if it still reaches its device (live, or vacated passing writes).
    pub bar: Option<usize>,
    /// A live BAR (else vacated: reads zero).
    pub live: bool,
}

/// BAR mappings of a PCI segment. See the module documentation.
///
/// Accesses that hit no BAR read all-ones and writes to them are dropped, as on a bus where no
/// device claims the cycle (master abort). An access that straddles the end of a BAR is treated
/// the same way: a guest cannot reach one BAR through the end of another.
///
/// Register one [`BarSpace`] over every window of the host bridge (it may be registered on
/// several ranges, memory and I/O): it works with absolute addresses, `base + offset`.
///
/// A VMM that pulls a device out may leave its BARs *vacated* rather than unmapped
/// ([`BarSpace::vacate_device`]): they read zero and drop writes (or pass them to the device,
/// see [`VacatedWrites`]) until a later mapping overlaps them, which evicts them. Some guest
/// drivers poll a register of a device they are letting go of until it reads zero (Linux's
/// virtio-pci reset does), and spin forever on the all-ones of a device that is really gone.
#[derive(Default)]
pub struct BarSpace {
    maps: RwLock<Maps>,
}

impl BarSpace {
    /// An empty space.
    pub fn new() -> Self {
        Self::default()
    }

    fn map_of(maps: &mut Maps, kind: BarKind) -> &mut BTreeMap<u64, Mapping> {
        if kind.is_io() {
            &mut maps.io
        } else {
            &mut maps.memory
        }
    }

    /// Maps BAR `index` of `device` at `address` (guest physical or port) for `size` bytes.
    /// Returns false, mapping nothing, if it would overlap another mapping or wrap around.
    pub fn map(
        &self,
        bdf: Bdf,
        device: &SharedPciDevice,
        kind: BarKind,
        index: usize,
        address: u64,
        size: u64,
    ) -> bool {
        let Some(end) = address.checked_add(size) else {
            return false;
        };
        if size == 0 {
            return false;
        }
        let mut maps = self.maps.write().unwrap_or_else(|e| e.into_inner());
        let map = Self::map_of(&mut maps, kind);
        // Mappings never overlap one another, so the overlapping ones are the last ones
        // starting before `end`, walked backwards. Vacated BARs give way.
        let mut vacated = Vec::new();
        for (&start, m) in map.range(..end).rev() {
            if start + m.size <= address {
                break;
            }
            if m.target.is_live() {
                return false;
            }
            vacated.push(start);
        }
        for start in vacated {
            map.remove(&start);
        }
        map.insert(
            address,
            Mapping {
                size,
                bdf,
                target: Target::Live(PciBarIo::new(device.clone(), index)),
            },
        );
        true
    }

    /// Vacates every mapping of `device` (live or vacated): from now on they read zero, without
    /// reaching the device, and writes are dropped or passed to it as `writes` says, until a
    /// later [`map`](Self::map) overlaps them. Returns how many mappings were vacated.
    pub fn vacate_device(&self, device: &SharedPciDevice, writes: VacatedWrites) -> usize {
        let mut maps = self.maps.write().unwrap_or_else(|e| e.into_inner());
        let maps = &mut *maps;
        let mut n = 0;
        for m in maps.memory.values_mut().chain(maps.io.values_mut()) {
            let Some(region) = m
                .target
                .device()
                .filter(|r| same_device(r.device(), device))
            else {
                continue;
            };
            m.target = Target::Vacated(match writes {
                VacatedWrites::Dropped => None,
                VacatedWrites::ToDevice => Some(region.clone()),
            });
            n += 1;
        }
        n
    }

    /// Removes the live mapping that starts at `address`, if it is BAR `index` of `device`,
    /// whatever bus number the function had when it was mapped (a guest may renumber the bus
    /// behind a bridge between two BAR moves).
    pub fn unmap(
        &self,
        device: &SharedPciDevice,
        kind: BarKind,
        index: usize,
        address: u64,
    ) -> bool {
        let mut maps = self.maps.write().unwrap_or_else(|e| e.into_inner());
        let map = Self::map_of(&mut maps, kind);
        match map.get(&address) {
            Some(Mapping {
                target: Target::Live(r),
                ..
            }) if r.bar() == index && same_device(r.device(), device) => {
                map.remove(&address);
                true
            }
            _ => false,
        }
    }

    /// Removes every mapping of `device`, wherever the guest put it and whatever bus number it
    /// had (e.g. when the device is unplugged), vacated ones that pass it writes included.
    /// Returns how many mappings went.
    pub fn unmap_device(&self, device: &SharedPciDevice) -> usize {
        let mut maps = self.maps.write().unwrap_or_else(|e| e.into_inner());
        let before = maps.memory.len() + maps.io.len();
        let other = |m: &Mapping| {
            !m.target
                .device()
                .is_some_and(|r| same_device(r.device(), device))
        };
        maps.memory.retain(|_, m| other(m));
        maps.io.retain(|_, m| other(m));
        before - maps.memory.len() - maps.io.len()
    }

    /// The vacated mappings that no longer reach a device ([`VacatedWrites::Dropped`]): what
    /// the guest still reads as zero where a pulled-out device's BARs were. They are guest
    /// visible, so a saved machine carries them ([`restore_vacated`](Self::restore_vacated)).
    /// The mappings of live devices are not listed: they follow from the devices' BARs.
    pub fn vacated(&self) -> Vec<VacatedRegion> {
        let maps = self.maps.read().unwrap_or_else(|e| e.into_inner());
        let list = |map: &BTreeMap<u64, Mapping>, io: bool| -> Vec<VacatedRegion> {
            map.iter()
                .filter(|(_, m)| matches!(m.target, Target::Vacated(None)))
                .map(|(&address, m)| VacatedRegion {
                    io,
                    address,
                    size: m.size,
                    bdf: m.bdf,
                })
                .collect()
        };
        let mut out = list(&maps.memory, false);
        out.extend(list(&maps.io, true));
        out
    }

    /// Puts back a vacated mapping [`vacated`](Self::vacated) listed. Returns false, adding
    /// nothing, if it would overlap a mapping.
    pub fn restore_vacated(&self, region: &VacatedRegion) -> bool {
        let Some(end) = region.address.checked_add(region.size) else {
            return false;
        };
        if region.size == 0 {
            return false;
        }
        let mut maps = self.maps.write().unwrap_or_else(|e| e.into_inner());
        let map = if region.io {
            &mut maps.io
        } else {
            &mut maps.memory
        };
        if map
            .range(..end)
            .next_back()
            .is_some_and(|(&start, m)| start + m.size > region.address)
        {
            return false;
        }
        map.insert(
            region.address,
            Mapping {
                size: region.size,
                bdf: region.bdf,
                target: Target::Vacated(None),
            },
        );
        true
    }

    /// Every mapping, memory ones first, each space in address order: where the guest reaches
    /// which BAR now (for diagnostics, and for checking a space against the devices' BARs).
    pub fn mappings(&self) -> Vec<BarMapping> {
        let maps = self.maps.read().unwrap_or_else(|e| e.into_inner());
        let list = |map: &BTreeMap<u64, Mapping>, io: bool| {
            map.iter()
                .map(|(&address, m)| BarMapping {
                    io,
                    address,
                    size: m.size,
                    bdf: m.bdf,
                    bar: m.target.device().map(PciBarIo::bar),
                    live: m.target.is_live(),
                })
                .collect::<Vec<_>>()
        };
        let mut out = list(&maps.memory, false);
        out.extend(list(&maps.io, true));
        out
    }

    /// Number of mappings (memory and I/O).
    pub fn len(&self) -> usize {
        let maps = self.maps.read().unwrap_or_else(|e| e.into_inner());
        maps.memory.len() + maps.io.len()
    }

    /// Whether nothing is mapped.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The mapping under `[address, address + len)` and the offset of `address` into it.
    fn find(&self, io: bool, address: u64, len: usize) -> Option<(Target, u64)> {
        let maps = self.maps.read().unwrap_or_else(|e| e.into_inner());
        let map = if io { &maps.io } else { &maps.memory };
        let (&start, m) = map.range(..=address).next_back()?;
        let offset = address - start;
        let end = offset.checked_add(len as u64)?;
        (end <= m.size).then(|| (m.target.clone(), offset))
    }

    fn read(&self, io: bool, address: Option<u64>, data: &mut [u8]) {
        match address.and_then(|a| self.find(io, a, data.len())) {
            Some((Target::Vacated(_), _)) => data.fill(0),
            Some((Target::Live(region), offset)) => {
                if io {
                    region.pio_read(PioAddress(0), offset as u16, data)
                } else {
                    region.mmio_read(MmioAddress(0), offset, data)
                }
            }
            None => data.fill(0xff),
        }
    }

    fn write(&self, io: bool, address: Option<u64>, data: &[u8]) {
        if let Some((Target::Live(region) | Target::Vacated(Some(region)), offset)) =
            address.and_then(|a| self.find(io, a, data.len()))
        {
            if io {
                region.pio_write(PioAddress(0), offset as u16, data)
            } else {
                region.mmio_write(MmioAddress(0), offset, data)
            }
        }
    }
}

impl DeviceMmio for BarSpace {
    fn mmio_read(&self, base: MmioAddress, offset: MmioAddressOffset, data: &mut [u8]) {
        self.read(false, base.0.checked_add(offset), data)
    }

    fn mmio_write(&self, base: MmioAddress, offset: MmioAddressOffset, data: &[u8]) {
        self.write(false, base.0.checked_add(offset), data)
    }
}

impl DevicePio for BarSpace {
    fn pio_read(&self, base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        let address = u64::from(base.0) + u64::from(offset);
        self.read(true, Some(address), data)
    }

    fn pio_write(&self, base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        let address = u64::from(base.0) + u64::from(offset);
        self.write(true, Some(address), data)
    }
}

impl BarReprogrammingHandler for BarSpace {
    fn reprogram_bars(&self, bdf: Bdf, device: &SharedPciDevice, changes: &[BarReprogram]) {
        for c in changes {
            if let Some(old) = c.old {
                // By device, not by `bdf`: the bus number behind a bridge may have changed
                // since the BAR was mapped (found by fuzz/fuzz_targets/pci_segment.rs).
                self.unmap(device, c.kind, c.index, old);
            }
        }
        for c in changes {
            if let Some(new) = c.new {
                if !self.map(bdf, device, c.kind, c.index, new, c.size) {
                    crate::guest_log::report(
                        "BAR overlap",
                        log::Level::Warn,
                        format_args!(
                            "PCI {bdf}: BAR{} at {new:#x} (+{:#x}) overlaps another BAR: not mapped",
                            c.index,
                            c.size
                        ),
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::pci::{ConfigWriteResult, PciDevice};

    /// BAR `n` reads as `n` in every byte and records writes.
    struct Probe {
        writes: Vec<(usize, u64, Vec<u8>)>,
    }

    impl PciDevice for Probe {
        fn id(&self) -> &str {
            "probe"
        }
        fn config_read(&mut self, _offset: u16, data: &mut [u8]) {
            data.fill(0);
        }
        fn config_write(&mut self, _offset: u16, _data: &[u8]) -> ConfigWriteResult {
            ConfigWriteResult::default()
        }
        fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
            data.fill(bar as u8 + offset as u8);
        }
        fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
            self.writes.push((bar, offset, data.to_vec()));
        }
    }

    fn probe() -> (Arc<Mutex<Probe>>, SharedPciDevice) {
        let p = Arc::new(Mutex::new(Probe { writes: Vec::new() }));
        let shared: SharedPciDevice = p.clone();
        (p, shared)
    }

    const MEM: BarKind = BarKind::Memory64 {
        prefetchable: false,
    };

    fn bdf(d: u8) -> Bdf {
        Bdf::new(0, d, 0).unwrap()
    }

    /// BAR 0 (64-bit memory, 4 KiB) moved from `old` to `new`.
    fn change(old: Option<u64>, new: Option<u64>) -> BarReprogram {
        BarReprogram {
            index: 0,
            kind: MEM,
            size: 0x1000,
            old,
            new,
        }
    }

    #[test]
    fn dispatches_to_the_bar_under_the_address() {
        let space = BarSpace::new();
        let (p, dev) = probe();
        assert!(space.map(bdf(1), &dev, MEM, 0, 0xc000_4000, 0x1000));
        assert!(space.map(bdf(1), &dev, BarKind::Io, 2, 0x1100, 0x20));
        let mut b = [0u8; 4];
        space.mmio_read(MmioAddress(0xc000_0000), 0x4010, &mut b);
        assert_eq!(b, [0x10; 4]);
        space.pio_read(PioAddress(0x1000), 0x101, &mut b[..1]);
        assert_eq!(b[0], 3);
        space.mmio_write(MmioAddress(0xc000_0000), 0x4ffc, &[1, 2, 3, 4]);
        assert_eq!(p.lock().unwrap().writes, vec![(0, 0xffc, vec![1, 2, 3, 4])]);
        // Outside any BAR, and straddling a BAR's end: master abort.
        space.mmio_read(MmioAddress(0xc000_0000), 0x3ffc, &mut b);
        assert_eq!(b, [0xff; 4]);
        space.mmio_read(MmioAddress(0xc000_0000), 0x4ffe, &mut b);
        assert_eq!(b, [0xff; 4]);
        space.mmio_write(MmioAddress(0xc000_0000), 0x4ffe, &[1, 2, 3, 4]);
        space.mmio_write(MmioAddress(0xc000_0000), u64::MAX, &[1]);
        space.mmio_read(MmioAddress(0xc000_0000), u64::MAX - 1, &mut b);
        assert_eq!(p.lock().unwrap().writes.len(), 1);
    }

    #[test]
    fn vacated_bars_read_zero_and_give_way() {
        let space = BarSpace::new();
        let (p, dev) = probe();
        let (_, other) = probe();
        assert!(space.map(bdf(1), &dev, MEM, 0, 0x10000, 0x1000));
        assert!(space.map(bdf(1), &dev, MEM, 2, 0x11000, 0x1000));
        assert!(space.map(bdf(2), &other, MEM, 0, 0x20000, 0x1000));
        assert_eq!(space.vacate_device(&dev, VacatedWrites::Dropped), 2);
        let mut b = [0xaau8; 4];
        space.mmio_read(MmioAddress(0), 0x10010, &mut b);
        assert_eq!(b, [0; 4], "vacated: zero");
        space.mmio_write(MmioAddress(0), 0x10010, &[1, 2, 3, 4]);
        assert!(
            p.lock().unwrap().writes.is_empty(),
            "never reaches the device"
        );
        space.mmio_read(MmioAddress(0), 0x20000, &mut b);
        assert_eq!(b, [0; 4], "the other device's BAR 0 still answers");
        // A new mapping over both vacated BARs evicts them; a live one still refuses.
        let (_, new) = probe();
        assert!(space.map(bdf(1), &new, MEM, 0, 0x10800, 0x1000));
        assert_eq!(space.len(), 2);
        space.mmio_read(MmioAddress(0), 0x10000, &mut b);
        assert_eq!(b, [0xff; 4], "the vacated BAR's uncovered part went too");
        assert!(!space.map(bdf(3), &new, MEM, 0, 0x20800, 0x1000));
        // Unmapping a device leaves no vacated BAR behind.
        assert_eq!(space.vacate_device(&other, VacatedWrites::Dropped), 1);
        assert_eq!(space.unmap_device(&other), 0);
    }

    #[test]
    fn vacated_bars_may_pass_writes_to_the_device() {
        let space = BarSpace::new();
        let (p, dev) = probe();
        assert!(space.map(bdf(1), &dev, MEM, 0, 0x10000, 0x1000));
        assert_eq!(space.vacate_device(&dev, VacatedWrites::ToDevice), 1);
        let mut b = [0xaau8; 4];
        space.mmio_read(MmioAddress(0), 0x10010, &mut b);
        assert_eq!(b, [0; 4], "reads never reach the device");
        space.mmio_write(MmioAddress(0), 0x10010, &[1, 2]);
        assert_eq!(p.lock().unwrap().writes.len(), 1, "writes do");
        // Vacated again, dropping writes: the mapping lets go of the device.
        assert_eq!(Arc::strong_count(&dev), 3, "probe, dev, the mapping");
        assert_eq!(space.vacate_device(&dev, VacatedWrites::Dropped), 1);
        assert_eq!(Arc::strong_count(&dev), 2);
        space.mmio_write(MmioAddress(0), 0x10010, &[1, 2]);
        assert_eq!(p.lock().unwrap().writes.len(), 1);
        // unmap_device takes a forwarding mapping away, and only its own.
        assert_eq!(space.vacate_device(&dev, VacatedWrites::ToDevice), 0);
        assert!(space.map(bdf(1), &dev, MEM, 0, 0x20000, 0x1000));
        assert_eq!(space.vacate_device(&dev, VacatedWrites::ToDevice), 1);
        assert_eq!(space.unmap_device(&dev), 1);
        assert_eq!(space.len(), 1);
        // A forwarding mapping gives way to a new one like any vacated BAR.
        assert!(space.map(bdf(1), &dev, MEM, 0, 0x20000, 0x1000));
        assert_eq!(space.vacate_device(&dev, VacatedWrites::ToDevice), 1);
        let (_, new) = probe();
        assert!(space.map(bdf(2), &new, MEM, 0, 0x20000, 0x1000));
        assert_eq!(Arc::strong_count(&dev), 2);
    }

    #[test]
    fn refuses_overlaps_and_wraparound() {
        let space = BarSpace::new();
        let (_, dev) = probe();
        assert!(space.map(bdf(1), &dev, MEM, 0, 0x10000, 0x1000));
        assert!(!space.map(bdf(2), &dev, MEM, 0, 0x10800, 0x1000));
        assert!(!space.map(bdf(2), &dev, MEM, 0, 0xf800, 0x1000));
        assert!(space.map(bdf(2), &dev, MEM, 0, 0x11000, 0x1000));
        assert!(space.map(bdf(2), &dev, MEM, 1, 0xf000, 0x1000));
        assert!(!space.map(bdf(3), &dev, MEM, 0, u64::MAX - 0xfff, 0x2000));
        assert!(!space.map(bdf(3), &dev, MEM, 0, 0x1000_0000, 0));
        // I/O and memory are separate spaces.
        assert!(space.map(bdf(3), &dev, BarKind::Io, 0, 0x10000, 0x100));
        assert_eq!(space.len(), 4);
    }

    #[test]
    fn reprogramming_moves_mappings() {
        let space = BarSpace::new();
        let (_, dev) = probe();
        space.reprogram_bars(bdf(1), &dev, &[change(None, Some(0x2000))]);
        let mut b = [0u8; 1];
        space.mmio_read(MmioAddress(0), 0x2000, &mut b);
        assert_eq!(b, [0]);
        space.reprogram_bars(bdf(1), &dev, &[change(Some(0x2000), Some(0x8000))]);
        space.mmio_read(MmioAddress(0), 0x2000, &mut b);
        assert_eq!(b, [0xff]);
        space.mmio_read(MmioAddress(0), 0x8001, &mut b);
        assert_eq!(b, [1]);
        // Another device cannot unmap it.
        let (_, other) = probe();
        assert!(!space.unmap(&other, MEM, 0, 0x8000));
        space.reprogram_bars(bdf(1), &dev, &[change(Some(0x8000), None)]);
        assert!(space.is_empty());
        space.reprogram_bars(bdf(1), &dev, &[change(None, Some(0x8000))]);
        assert_eq!(space.unmap_device(&dev), 1);
        assert!(space.is_empty());
    }

    /// A guest that renumbers the bus behind a bridge and then moves a BAR of the function
    /// there: the move is reported with the new bus number, and the mapping made under the old
    /// one goes all the same (it stayed, live and stale, before).
    #[test]
    fn a_bar_moved_after_its_bus_was_renumbered_leaves_no_stale_mapping() {
        let space = BarSpace::new();
        let (_, dev) = probe();
        let (_, other) = probe();
        let (on_bus_1, on_bus_2) = (Bdf::new(1, 0, 0).unwrap(), Bdf::new(2, 0, 0).unwrap());
        space.reprogram_bars(on_bus_1, &dev, &[change(None, Some(0x2000))]);
        space.reprogram_bars(on_bus_2, &dev, &[change(Some(0x2000), Some(0x8000))]);
        let live: Vec<u64> = space.mappings().iter().map(|m| m.address).collect();
        assert_eq!(live, [0x8000]);
        assert_eq!(space.mappings()[0].bdf, on_bus_2);
        // Another device's BAR at the same place is not taken away.
        assert!(space.map(on_bus_1, &other, MEM, 0, 0x2000, 0x1000));
        assert!(!space.unmap(&dev, MEM, 0, 0x2000));
        assert!(!space.unmap(&other, MEM, 1, 0x2000));
        assert!(space.unmap(&other, MEM, 0, 0x2000));
    }

    #[test]
    fn unmap_device_removes_its_mappings_whatever_the_bdf() {
        let space = BarSpace::new();
        let (_, a) = probe();
        let (_, b) = probe();
        assert!(space.map(bdf(1), &a, MEM, 0, 0x1000, 0x1000));
        assert!(space.map(bdf(2), &a, BarKind::Io, 2, 0x100, 0x10));
        assert!(space.map(bdf(1), &b, MEM, 0, 0x4000, 0x1000));
        assert_eq!(space.unmap_device(&a), 2);
        assert_eq!(space.len(), 1);
        assert_eq!(space.unmap_device(&a), 0);
    }
}
