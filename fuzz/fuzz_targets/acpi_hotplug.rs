//! Fuzzes the ACPI hot-plug controller and the `_OSC` report registers: arbitrary guest port
//! accesses (any length, any offset in and past the blocks) interleaved with the VMM's slot
//! operations, checked step by step against a model written from the register tables in the
//! modules' documentation:
//!
//! - every read returns what the model says (misdecoded accesses read all-ones), and every
//!   access that is not an aligned dword is counted as ignored;
//! - insert, remove and bus-check bits are write-1-to-clear and only ever set by the VMM, the
//!   pending register is their union per bus, an eject only takes occupied slots not already
//!   ejected and is reported to the observer exactly once;
//! - the VMM's operations succeed or fail as the model says and raise the interrupt exactly
//!   when they latch something for the guest;
//! - `_OSC`: reads return what was written, each write of the granted register is one
//!   evaluation, and the committed one is the last without the query flag.

#![no_main]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use devices::acpi_hotplug::{
    AcpiHotplugController, AcpiHotplugObserver, ACPI_HOTPLUG_PORTS, REG_BUS_CHECK, REG_EJECT,
    REG_INSERT, REG_PENDING, REG_REMOVE, REG_SELECT, SLOTS_PER_BUS,
};
use devices::interrupt::InterruptLine;
use devices::osc_report::{OscReport, CDW1_QUERY, OSC_REPORT_PORTS, REG_GRANTED};
use hotplug_vmm_fuzz::access_len;
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use vm_device::bus::PioAddress;
use vm_device::MutDevicePio;

const BASE: PioAddress = PioAddress(0xae00);

#[derive(Default)]
struct Irq(AtomicUsize);

impl InterruptLine for Irq {
    fn trigger(&self) -> std::io::Result<()> {
        self.0.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

#[derive(Default)]
struct Ejects(Mutex<Vec<(u8, u8)>>);

impl AcpiHotplugObserver for Ejects {
    fn ejected(&self, bus: u8, slot: u8) {
        self.0.lock().unwrap().push((bus, slot));
    }
}

#[derive(Arbitrary, Debug)]
enum Op {
    Read {
        offset: u8,
        len: u8,
    },
    Write {
        offset: u8,
        len: u8,
        value: u32,
    },
    /// Aligned dword writes, the AML's way, with the value's bits where the slots are.
    Select {
        bus: u8,
    },
    Ack {
        register: u8,
        value: u32,
    },
    ColdPlug {
        bus: u8,
        slot: u8,
    },
    Insert {
        bus: u8,
        slot: u8,
    },
    RequestEject {
        bus: u8,
        slot: u8,
    },
    Remove {
        bus: u8,
        slot: u8,
    },
    Surprise {
        bus: u8,
        slot: u8,
    },
    OscRead {
        offset: u8,
        len: u8,
    },
    OscWrite {
        offset: u8,
        len: u8,
        value: u32,
    },
}

#[derive(Arbitrary, Debug)]
struct Input {
    /// Hot-pluggable slots of each bus (1..=4 buses).
    hotpluggable: Vec<u32>,
    ops: Vec<Op>,
}

/// One bus as the register table describes it.
#[derive(Clone, Copy, Default, Debug)]
struct Bus {
    hotpluggable: u32,
    occupied: u32,
    insert: u32,
    remove: u32,
    ejected: u32,
    vanished: u32,
}

#[derive(Default, Debug)]
struct Model {
    buses: Vec<Bus>,
    select: u32,
    ignored: u64,
    interrupts: usize,
    ejects: Vec<(u8, u8)>,
}

impl Model {
    fn slot(&mut self, bus: u8, slot: u8) -> Option<&mut Bus> {
        let b = self.buses.get_mut(usize::from(bus))?;
        (slot < SLOTS_PER_BUS && b.hotpluggable & (1 << slot) != 0).then_some(b)
    }

    fn selected(&mut self) -> Option<&mut Bus> {
        let i = usize::try_from(self.select).ok()?;
        if i > 255 {
            return None;
        }
        self.buses.get_mut(i)
    }

    fn decode(&mut self, offset: u16, len: usize, ports: u16) -> Option<u16> {
        let ok = decodes(offset, len, ports);
        if !ok {
            self.ignored += 1;
        }
        ok.then_some(offset)
    }

    fn read(&mut self, offset: u16, len: usize) -> Vec<u8> {
        let Some(reg) = self.decode(offset, len, ACPI_HOTPLUG_PORTS) else {
            return vec![0xff; len];
        };
        let pending = self
            .buses
            .iter()
            .take(32)
            .enumerate()
            .filter(|(_, b)| b.insert | b.remove | b.vanished != 0)
            .fold(0u32, |m, (i, _)| m | 1 << i);
        let select = self.select;
        let bus = self.selected().copied();
        let value = match (reg, bus) {
            (REG_SELECT, _) => select,
            (REG_PENDING, _) => pending,
            (REG_INSERT, Some(b)) => b.insert,
            (REG_REMOVE, Some(b)) => b.remove,
            (REG_BUS_CHECK, Some(b)) => b.vanished,
            _ => 0,
        };
        value.to_le_bytes().to_vec()
    }

    fn write(&mut self, offset: u16, data: &[u8]) {
        let Some(reg) = self.decode(offset, data.len(), ACPI_HOTPLUG_PORTS) else {
            return;
        };
        let value = u32::from_le_bytes(data.try_into().unwrap());
        if reg == REG_SELECT {
            self.select = value;
            return;
        }
        let index = self.select as u8;
        let Some(b) = self.selected() else {
            return;
        };
        let mut ejected = Vec::new();
        match reg {
            REG_INSERT => b.insert &= !value,
            REG_REMOVE => b.remove &= !value,
            REG_BUS_CHECK => b.vanished &= !value,
            REG_EJECT => {
                let ejects = value & b.occupied & b.hotpluggable & !b.ejected;
                b.ejected |= ejects;
                b.remove &= !ejects;
                b.insert &= !ejects;
                ejected.extend((0..SLOTS_PER_BUS).filter(|s| ejects & (1 << s) != 0));
            }
            _ => {}
        }
        self.ejects.extend(ejected.into_iter().map(|s| (index, s)));
    }
}

/// Whether a block of `ports` decodes an access: an aligned dword inside it (`DWordAcc`).
fn decodes(offset: u16, len: usize, ports: u16) -> bool {
    len == 4 && offset % 4 == 0 && offset < ports
}

fn pio_read(dev: &mut impl MutDevicePio, offset: u16, len: usize) -> Vec<u8> {
    let mut data = vec![0u8; len];
    dev.pio_read(BASE, offset, &mut data);
    data
}

fuzz_target!(|input: Input| {
    let mut hotpluggable: Vec<u32> = input.hotpluggable.iter().copied().take(4).collect();
    if hotpluggable.is_empty() {
        hotpluggable.push(0xfffe);
    }
    let irq = Arc::new(Irq::default());
    let ejects = Arc::new(Ejects::default());
    let mut c = AcpiHotplugController::new(&hotpluggable, irq.clone());
    c.set_observer(Some(ejects.clone()));
    let mut m = Model {
        buses: hotpluggable
            .iter()
            .map(|&h| Bus {
                hotpluggable: h,
                ..Bus::default()
            })
            .collect(),
        ..Model::default()
    };
    let mut osc = OscReport::new();
    let mut osc_regs = [0u32; 4];
    let (mut evaluations, mut committed, mut osc_ignored) = (0u64, None, 0u64);

    for op in input.ops.iter().take(512) {
        match *op {
            Op::Read { offset, len } => {
                let len = access_len(len);
                let offset = u16::from(offset) % 0x20;
                assert_eq!(
                    pio_read(&mut c, offset, len),
                    m.read(offset, len),
                    "read {offset:#x}/{len}"
                );
            }
            Op::Write { offset, len, value } => {
                let data = &u64::from(value).to_le_bytes()[..access_len(len)];
                let offset = u16::from(offset) % 0x20;
                c.pio_write(BASE, offset, data);
                m.write(offset, data);
            }
            Op::Select { bus } => {
                let data = u32::from(bus % 6).to_le_bytes();
                c.pio_write(BASE, REG_SELECT, &data);
                m.write(REG_SELECT, &data);
            }
            Op::Ack { register, value } => {
                let reg =
                    [REG_INSERT, REG_REMOVE, REG_EJECT, REG_BUS_CHECK][usize::from(register % 4)];
                c.pio_write(BASE, reg, &value.to_le_bytes());
                m.write(reg, &value.to_le_bytes());
            }
            Op::ColdPlug { bus, slot } | Op::Insert { bus, slot } => {
                let (bus, slot) = (bus % 6, slot % 34);
                let insert = matches!(op, Op::Insert { .. });
                let result = if insert {
                    c.insert(bus, slot)
                } else {
                    c.cold_plug(bus, slot)
                };
                let want = m
                    .slot(bus, slot)
                    .filter(|b| b.occupied & (1 << slot) == 0)
                    .map(|b| {
                        b.occupied |= 1 << slot;
                        if insert {
                            b.insert |= 1 << slot;
                            b.remove &= !(1 << slot);
                            b.ejected &= !(1 << slot);
                        }
                    });
                assert_eq!(result.is_ok(), want.is_some(), "{op:?}: {result:?}");
                if want.is_some() && insert {
                    m.interrupts += 1;
                }
            }
            Op::RequestEject { bus, slot } => {
                let (bus, slot) = (bus % 6, slot % 34);
                let result = c.request_eject(bus, slot);
                let want = m
                    .slot(bus, slot)
                    .filter(|b| b.occupied & (1 << slot) != 0)
                    .map(|b| {
                        b.remove |= 1 << slot;
                        b.insert &= !(1 << slot);
                    });
                assert_eq!(result.is_ok(), want.is_some(), "{op:?}: {result:?}");
                m.interrupts += usize::from(want.is_some());
            }
            Op::Remove { bus, slot } | Op::Surprise { bus, slot } => {
                let (bus, slot) = (bus % 6, slot % 34);
                let surprise = matches!(op, Op::Surprise { .. });
                let result = if surprise {
                    c.surprise_remove(bus, slot)
                } else {
                    c.remove(bus, slot)
                };
                let want = m
                    .slot(bus, slot)
                    .filter(|b| b.occupied & (1 << slot) != 0)
                    .map(|b| {
                        let mask = !(1u32 << slot);
                        b.occupied &= mask;
                        b.insert &= mask;
                        b.remove &= mask;
                        b.ejected &= mask;
                        if surprise {
                            b.vanished |= 1 << slot;
                        }
                    });
                assert_eq!(result.is_ok(), want.is_some(), "{op:?}: {result:?}");
                m.interrupts += usize::from(want.is_some() && surprise);
            }
            Op::OscRead { offset, len } => {
                let len = access_len(len);
                let offset = u16::from(offset) % 0x14;
                let ok = decodes(offset, len, OSC_REPORT_PORTS);
                osc_ignored += u64::from(!ok);
                let want = if ok {
                    osc_regs[usize::from(offset / 4)].to_le_bytes().to_vec()
                } else {
                    vec![0xff; len]
                };
                assert_eq!(
                    pio_read(&mut osc, offset, len),
                    want,
                    "_OSC read {offset:#x}/{len}"
                );
            }
            Op::OscWrite { offset, len, value } => {
                let data = &u64::from(value).to_le_bytes()[..access_len(len)];
                let offset = u16::from(offset) % 0x14;
                osc.pio_write(BASE, offset, data);
                osc_ignored += u64::from(!decodes(offset, data.len(), OSC_REPORT_PORTS));
                if decodes(offset, data.len(), OSC_REPORT_PORTS) {
                    osc_regs[usize::from(offset / 4)] = value;
                    if offset == REG_GRANTED {
                        evaluations += 1;
                        if osc_regs[0] & CDW1_QUERY == 0 {
                            committed = Some((osc_regs[1], osc_regs[2], value));
                        }
                    }
                }
            }
        }
        // The controller's state is the model's.
        for (i, want) in m.buses.iter().enumerate() {
            let got = c.bus(i as u8).expect("bus");
            assert_eq!(
                (
                    got.occupied,
                    got.insert,
                    got.remove,
                    got.ejected,
                    got.vanished
                ),
                (
                    want.occupied,
                    want.insert,
                    want.remove,
                    want.ejected,
                    want.vanished
                ),
                "bus {i} after {op:?}"
            );
            for bits in [got.occupied, got.insert, got.remove, got.vanished] {
                assert_eq!(
                    bits & !got.hotpluggable,
                    0,
                    "a bit for a slot that is not hot-pluggable"
                );
            }
            assert_eq!(got.ejected & !got.occupied, 0, "an empty slot ejected");
        }
        assert_eq!(
            c.ignored_accesses(),
            m.ignored,
            "ignored accesses after {op:?}"
        );
        assert_eq!(
            osc.ignored_accesses(),
            osc_ignored,
            "ignored _OSC accesses after {op:?}"
        );
        assert_eq!(
            irq.0.load(Ordering::Relaxed),
            m.interrupts,
            "interrupts after {op:?}"
        );
        assert_eq!(*ejects.0.lock().unwrap(), m.ejects, "ejects after {op:?}");
        assert_eq!(osc.evaluations(), evaluations);
        assert_eq!(
            osc.committed().map(|e| (e.support, e.requested, e.granted)),
            committed
        );
    }
});
