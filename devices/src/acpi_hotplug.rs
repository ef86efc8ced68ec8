//! The ACPI PCI hot-plug controller: the register block through which the DSDT's AML learns
//! which slots have news for the guest, and into which a slot's `_EJ0` writes the eject.
//!
//! ACPI hot-plug has no standard register interface: the platform defines one and its AML
//! (built by the `acpi` crate's `pci_hotplug` module) drives it. The flow, as Linux's acpiphp
//! sees it:
//!
//! 1. The VMM calls [`AcpiHotplugController::insert`] or
//!    [`AcpiHotplugController::request_eject`]: a bit is latched in the slot's bus and the
//!    controller's [`InterruptLine`] fires (a Generic Event Device interrupt).
//! 2. The GED's `_EVT` method reads [`REG_PENDING`] to learn which buses have news, selects each
//!    of those in turn ([`REG_SELECT`]), reads [`REG_INSERT`] and [`REG_REMOVE`], writes back
//!    what it read to acknowledge it (write-1-to-clear), and `Notify`s each slot: Device Check
//!    (1) for an insert, Eject Request (3) for a removal. (Every AML statement costs the guest
//!    time, milliseconds each where its kernel runs slowly, so the method skips quiet buses.)
//! 3. For a Device Check acpiphp rescans the slot and probes the new function. For an Eject
//!    Request it unbinds and removes the function, then evaluates the slot's `_EJ0`, which writes
//!    `1 << slot` to [`REG_EJECT`]. The controller tells its [`AcpiHotplugObserver`], and the VMM
//!    removes the device and then calls [`AcpiHotplugController::remove`].
//! 4. A device pulled out without asking the guest: the VMM takes it off the bus (its vendor
//!    ID reads all-ones) and calls [`AcpiHotplugController::surprise_remove`], which latches a
//!    bus check for the slot's bus. The `_EVT` method reads [`REG_BUS_CHECK`] and `Notify`s
//!    the bus's parent object (the root port, or the host bridge for the root bus) with Bus
//!    Check (0): acpiphp re-checks every slot of the bus and removes the functions that no
//!    longer answer. (A Device or Bus Check on the slot itself only looks for new functions.)
//!
//! # Register block
//!
//! Twenty-four consecutive I/O ports; six 32-bit registers, bit `n` of the first five standing
//! for device number `n` of the selected bus. Only aligned 32-bit accesses are decoded (the AML
//! declares the fields `DWordAcc`): any other access reads all-ones and its write is dropped.
//!
//! | offset | name | access | meaning |
//! | --- | --- | --- | --- |
//! | 0x0 | [`REG_SELECT`] | RW | bus the other registers refer to: an index into the controller's buses (0 is the root bus by convention); an unknown index reads zeros and ignores writes |
//! | 0x4 | [`REG_INSERT`] | RW1C | slots with a device check pending (a device was inserted) |
//! | 0x8 | [`REG_REMOVE`] | RW1C | slots with an eject request pending |
//! | 0xC | [`REG_EJECT`] | WO, reads 0 | the guest ejects the slots whose bits it writes; bits of empty slots are ignored |
//! | 0x10 | [`REG_BUS_CHECK`] | RW1C | slots whose device vanished (surprise removal): the bus needs a Bus Check |
//! | 0x14 | [`REG_PENDING`] | RO | bit `b`: bus `b` (0..=31) has a bit set in its insert, remove or bus check register; independent of the select register, writes ignored |
//!
//! Nothing here knows about KVM, PCI buses or the control socket; the VMM maps bus indexes to its
//! buses and keeps the devices.

use std::fmt;
use std::sync::Arc;

use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::MutDevicePio;

use crate::interrupt::InterruptLine;
use crate::register_trace::{RegisterAccess, RegisterTracer};
use crate::state::StateError;

pub use platform::acpi_hotplug::{
    ACPI_HOTPLUG_PORTS, REG_BUS_CHECK, REG_EJECT, REG_INSERT, REG_PENDING, REG_REMOVE, REG_SELECT,
    SLOTS_PER_BUS,
};

/// What the controller tells the VMM, on the thread of the guest's access and while the
/// controller is locked: implementations must not lock it again (queue the work instead).
pub trait AcpiHotplugObserver: Send + Sync {
    /// The guest's `_EJ0` ejected device `slot` of bus `bus`: the guest has let go of it, and
    /// the VMM may now remove it (then calls [`AcpiHotplugController::remove`]).
    fn ejected(&self, bus: u8, slot: u8);
    /// The guest's event method read the pending events of bus `bus` (the AML is running).
    fn serviced(&self, _bus: u8) {}
}

/// Why a VMM request was refused; the controller is unchanged.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AcpiHotplugError {
    /// The bus index is not one of the controller's buses.
    #[error("ACPI hot-plug controller has no bus {0}")]
    NoSuchBus(u8),
    /// The device number is not a hot-pluggable slot of the bus.
    #[error("device {slot} of ACPI hot-plug bus {bus} is not a hot-pluggable slot")]
    NotHotpluggable {
        /// Bus index.
        bus: u8,
        /// Device number.
        slot: u8,
    },
    /// The slot already holds a device.
    #[error("slot {slot} of ACPI hot-plug bus {bus} is occupied")]
    Occupied {
        /// Bus index.
        bus: u8,
        /// Device number.
        slot: u8,
    },
    /// The slot holds no device.
    #[error("slot {slot} of ACPI hot-plug bus {bus} is empty")]
    Empty {
        /// Bus index.
        bus: u8,
        /// Device number.
        slot: u8,
    },
}

/// State of one bus's slots, one bit per device number.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AcpiBusState {
    /// Device numbers the DSDT describes as hot-pluggable slots.
    pub hotpluggable: u32,
    /// Slots holding a device.
    pub occupied: u32,
    /// Device checks not yet acknowledged by the guest.
    pub insert: u32,
    /// Eject requests not yet acknowledged by the guest.
    pub remove: u32,
    /// Slots the guest has ejected and the VMM has not yet emptied.
    pub ejected: u32,
    /// Slots whose device vanished (surprise removal), bus check not yet acknowledged.
    pub vanished: u32,
    /// How often the guest's event method has read this bus's pending events.
    pub serviced: u64,
}

/// The ACPI PCI hot-plug controller; see the [module documentation](self).
pub struct AcpiHotplugController {
    buses: Vec<AcpiBusState>,
    select: u32,
    interrupt: Arc<dyn InterruptLine>,
    observer: Option<Arc<dyn AcpiHotplugObserver>>,
    tracer: Option<Arc<dyn RegisterTracer>>,
    ignored_accesses: u64,
}

/// The name [`RegisterAccess::device`] carries for the controller's registers.
pub const TRACE_DEVICE: &str = "acpi-hotplug";

/// A register's name in traces.
fn register_name(offset: u16) -> &'static str {
    match offset {
        REG_SELECT => "SELECT",
        REG_INSERT => "INSERT",
        REG_REMOVE => "REMOVE",
        REG_EJECT => "EJECT",
        REG_BUS_CHECK => "BUS_CHECK",
        _ => "PENDING",
    }
}

impl fmt::Debug for AcpiHotplugController {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AcpiHotplugController")
            .field("buses", &self.buses)
            .field("select", &self.select)
            .field("ignored_accesses", &self.ignored_accesses)
            .finish_non_exhaustive()
    }
}

fn bit(slot: u8) -> u32 {
    1u32 << slot
}

impl AcpiHotplugController {
    /// A controller for `hotpluggable.len()` buses (at most 256), bus `i` having the hot-pluggable
    /// device numbers set in `hotpluggable[i]`, raising `interrupt` when it has news.
    pub fn new(hotpluggable: &[u32], interrupt: Arc<dyn InterruptLine>) -> Self {
        AcpiHotplugController {
            buses: hotpluggable
                .iter()
                .take(256)
                .map(|&hotpluggable| AcpiBusState {
                    hotpluggable,
                    ..Default::default()
                })
                .collect(),
            select: 0,
            interrupt,
            observer: None,
            tracer: None,
            ignored_accesses: 0,
        }
    }

    /// Sets who hears of the guest's ejects.
    pub fn set_observer(&mut self, observer: Option<Arc<dyn AcpiHotplugObserver>>) {
        self.observer = observer;
    }

    /// Sets (or clears) who hears of every guest access to the registers.
    pub fn set_tracer(&mut self, tracer: Option<Arc<dyn RegisterTracer>>) {
        self.tracer = tracer;
    }

    fn trace(&self, offset: u16, write: bool, value: u32) {
        if let Some(tracer) = &self.tracer {
            tracer.access(&RegisterAccess {
                device: TRACE_DEVICE,
                register: register_name(offset),
                write,
                value,
                after: write.then(|| self.peek(offset)),
            });
        }
    }

    /// A register's value without the side effects of a guest read.
    fn peek(&self, offset: u16) -> u32 {
        let bus = u8::try_from(self.select)
            .ok()
            .and_then(|b| self.buses.get(usize::from(b)));
        match (offset, bus) {
            (REG_SELECT, _) => self.select,
            (REG_PENDING, _) => self.pending_buses(),
            (REG_INSERT, Some(b)) => b.insert,
            (REG_REMOVE, Some(b)) => b.remove,
            (REG_BUS_CHECK, Some(b)) => b.vanished,
            _ => 0,
        }
    }

    /// Buses 0..=31 with events for the guest, one bit each: what [`REG_PENDING`] reads.
    pub fn pending_buses(&self) -> u32 {
        self.buses
            .iter()
            .take(32)
            .enumerate()
            .filter(|(_, b)| b.insert | b.remove | b.vanished != 0)
            .fold(0, |m, (i, _)| m | 1 << i)
    }

    /// The state of bus `bus`.
    pub fn bus(&self, bus: u8) -> Option<&AcpiBusState> {
        self.buses.get(usize::from(bus))
    }

    /// Number of buses.
    pub fn bus_count(&self) -> usize {
        self.buses.len()
    }

    /// Guest accesses that were not aligned 32-bit accesses to a register (ignored).
    pub fn ignored_accesses(&self) -> u64 {
        self.ignored_accesses
    }

    fn slot_mut(&mut self, bus: u8, slot: u8) -> Result<&mut AcpiBusState, AcpiHotplugError> {
        let state = self
            .buses
            .get_mut(usize::from(bus))
            .ok_or(AcpiHotplugError::NoSuchBus(bus))?;
        if slot >= SLOTS_PER_BUS || state.hotpluggable & bit(slot) == 0 {
            return Err(AcpiHotplugError::NotHotpluggable { bus, slot });
        }
        Ok(state)
    }

    fn raise(&self) {
        if let Err(e) = self.interrupt.trigger() {
            log::warn!("ACPI hot-plug interrupt: {e}");
        }
    }

    /// Marks a slot occupied by a device present at boot: no event for the guest, which finds
    /// it by enumeration.
    pub fn cold_plug(&mut self, bus: u8, slot: u8) -> Result<(), AcpiHotplugError> {
        let state = self.slot_mut(bus, slot)?;
        if state.occupied & bit(slot) != 0 {
            return Err(AcpiHotplugError::Occupied { bus, slot });
        }
        state.occupied |= bit(slot);
        Ok(())
    }

    /// A device was put into the slot (the VMM made it answer on the bus first): latches a
    /// device check and raises the interrupt.
    pub fn insert(&mut self, bus: u8, slot: u8) -> Result<(), AcpiHotplugError> {
        self.cold_plug(bus, slot)?;
        let state = self.slot_mut(bus, slot)?;
        state.insert |= bit(slot);
        state.remove &= !bit(slot);
        state.ejected &= !bit(slot);
        self.raise();
        Ok(())
    }

    /// Asks the guest to let go of the slot's device: latches an eject request and raises the
    /// interrupt. The guest answers by ejecting the slot (or not at all).
    pub fn request_eject(&mut self, bus: u8, slot: u8) -> Result<(), AcpiHotplugError> {
        let state = self.slot_mut(bus, slot)?;
        if state.occupied & bit(slot) == 0 {
            return Err(AcpiHotplugError::Empty { bus, slot });
        }
        state.remove |= bit(slot);
        state.insert &= !bit(slot);
        self.raise();
        Ok(())
    }

    /// The VMM has removed the slot's device after the guest ejected it: the slot is empty
    /// and nothing is pending for it.
    pub fn remove(&mut self, bus: u8, slot: u8) -> Result<(), AcpiHotplugError> {
        let state = self.slot_mut(bus, slot)?;
        if state.occupied & bit(slot) == 0 {
            return Err(AcpiHotplugError::Empty { bus, slot });
        }
        let mask = !bit(slot);
        state.occupied &= mask;
        state.insert &= mask;
        state.remove &= mask;
        state.ejected &= mask;
        Ok(())
    }

    /// The VMM pulled the slot's device out without asking the guest (it no longer answers on
    /// the bus): the slot is empty, a pending device check or eject request is dropped, and a
    /// bus check is latched for the slot's bus and the interrupt raised.
    pub fn surprise_remove(&mut self, bus: u8, slot: u8) -> Result<(), AcpiHotplugError> {
        self.remove(bus, slot)?;
        let state = self.slot_mut(bus, slot)?;
        state.vanished |= bit(slot);
        self.raise();
        Ok(())
    }

    fn selected(&mut self) -> Option<(u8, &mut AcpiBusState)> {
        let index = u8::try_from(self.select).ok()?;
        self.buses
            .get_mut(usize::from(index))
            .map(|state| (index, state))
    }

    fn read_register(&mut self, offset: u16) -> u32 {
        let value = self.peek(offset);
        if matches!(offset, REG_INSERT | REG_REMOVE | REG_BUS_CHECK) {
            if let Some((index, state)) = self.selected() {
                state.serviced += 1;
                if let Some(observer) = &self.observer {
                    observer.serviced(index);
                }
            }
        }
        value
    }

    fn write_register(&mut self, offset: u16, value: u32) {
        match offset {
            REG_SELECT => self.select = value,
            REG_INSERT => {
                if let Some((_, state)) = self.selected() {
                    state.insert &= !value;
                }
            }
            REG_REMOVE => {
                if let Some((_, state)) = self.selected() {
                    state.remove &= !value;
                }
            }
            REG_BUS_CHECK => {
                if let Some((_, state)) = self.selected() {
                    state.vanished &= !value;
                }
            }
            REG_EJECT => {
                let observer = self.observer.clone();
                let Some((index, state)) = self.selected() else {
                    return;
                };
                // Only occupied slots that are not already on their way out.
                let ejects = value & state.occupied & state.hotpluggable & !state.ejected;
                if value & !ejects != 0 {
                    log::debug!(
                        "ACPI hot-plug bus {index}: eject of {:#x} ignored (empty or already ejected)",
                        value & !ejects
                    );
                }
                state.ejected |= ejects;
                state.remove &= !ejects;
                state.insert &= !ejects;
                for slot in 0..SLOTS_PER_BUS {
                    if ejects & bit(slot) != 0 {
                        if let Some(observer) = &observer {
                            observer.ejected(index, slot);
                        }
                    }
                }
            }
            _ => {}
        }
    }

    fn decode(&mut self, offset: PioAddressOffset, len: usize) -> Option<u16> {
        crate::dword_registers::decode(offset, len, ACPI_HOTPLUG_PORTS, &mut self.ignored_accesses)
    }
}

impl MutDevicePio for AcpiHotplugController {
    fn pio_read(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        match self.decode(offset, data.len()) {
            Some(reg) => {
                let value = self.read_register(reg);
                data.copy_from_slice(&value.to_le_bytes());
                self.trace(reg, false, value);
            }
            None => data.fill(0xff),
        }
    }

    fn pio_write(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        if let Some(reg) = self.decode(offset, data.len()) {
            let mut bytes = [0u8; 4];
            bytes.copy_from_slice(data);
            let value = u32::from_le_bytes(bytes);
            self.write_register(reg, value);
            self.trace(reg, true, value);
        }
    }
}

/// The saved state of an [`AcpiHotplugController`]: every bus's slot bitmaps (pending eject
/// requests, device checks, ejects and bus checks included), the bus the guest selected, and
/// the count of ignored accesses.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AcpiHotplugState {
    /// Each bus, in bus select order.
    pub buses: Vec<AcpiBusState>,
    /// The bus select register.
    pub select: u32,
    /// Accesses the controller ignored.
    pub ignored_accesses: u64,
}

impl AcpiHotplugController {
    /// The controller's state now.
    pub fn state(&self) -> AcpiHotplugState {
        AcpiHotplugState {
            buses: self.buses.clone(),
            select: self.select,
            ignored_accesses: self.ignored_accesses,
        }
    }

    /// Puts `state` back. Refused, changing nothing, unless it has the same buses with the same
    /// hot-pluggable slots. Nothing is signalled: an event the guest has not serviced yet is in
    /// the restored bitmaps, and its interrupt in the interrupt controller's own state.
    pub fn restore(&mut self, state: &AcpiHotplugState) -> Result<(), StateError> {
        let masks =
            |buses: &[AcpiBusState]| -> Vec<u32> { buses.iter().map(|b| b.hotpluggable).collect() };
        crate::state::expect_same(
            "ACPI hot-plug controller",
            "hot-pluggable slots per bus",
            masks(&state.buses),
            masks(&self.buses),
        )?;
        self.buses.clone_from(&state.buses);
        self.select = state.select;
        self.ignored_accesses = state.ignored_accesses;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interrupt::CountingInterrupt;
    use std::sync::Mutex;

    const B: PioAddress = PioAddress(0x620);

    #[derive(Default)]
    struct Ejects(Mutex<Vec<(u8, u8)>>);
    impl AcpiHotplugObserver for Ejects {
        fn ejected(&self, bus: u8, slot: u8) {
            self.0.lock().unwrap().push((bus, slot));
        }
    }

    fn controller() -> (AcpiHotplugController, Arc<CountingInterrupt>, Arc<Ejects>) {
        let irq = Arc::new(CountingInterrupt::default());
        // Bus 0: devices 1..=15 hot-pluggable; bus 1 (a root port's): device 0.
        let mut c = AcpiHotplugController::new(&[0xfffe, 0x1], irq.clone());
        let ejects = Arc::new(Ejects::default());
        c.set_observer(Some(ejects.clone()));
        (c, irq, ejects)
    }

    fn rd(c: &mut AcpiHotplugController, reg: u16) -> u32 {
        let mut b = [0u8; 4];
        c.pio_read(B, reg, &mut b);
        u32::from_le_bytes(b)
    }

    fn wr(c: &mut AcpiHotplugController, reg: u16, v: u32) {
        c.pio_write(B, reg, &v.to_le_bytes());
    }

    /// What the GED's `_EVT` does for one bus: select, read, acknowledge.
    fn service(c: &mut AcpiHotplugController, bus: u32) -> (u32, u32) {
        wr(c, REG_SELECT, bus);
        let insert = rd(c, REG_INSERT);
        let remove = rd(c, REG_REMOVE);
        wr(c, REG_INSERT, insert);
        wr(c, REG_REMOVE, remove);
        (insert, remove)
    }

    #[test]
    fn hot_add_then_eject_as_acpiphp_does() {
        let (mut c, irq, ejects) = controller();
        c.insert(0, 3).unwrap();
        assert_eq!(irq.count(), 1);
        assert_eq!(service(&mut c, 1), (0, 0));
        assert_eq!(service(&mut c, 0), (1 << 3, 0));
        // Acknowledged: a second run of the event method finds nothing.
        assert_eq!(service(&mut c, 0), (0, 0));
        assert_eq!(c.bus(0).unwrap().occupied, 1 << 3);

        c.request_eject(0, 3).unwrap();
        assert_eq!(irq.count(), 2);
        assert_eq!(service(&mut c, 0), (0, 1 << 3));
        assert!(ejects.0.lock().unwrap().is_empty());
        // _EJ0 of slot 3.
        wr(&mut c, REG_SELECT, 0);
        wr(&mut c, REG_EJECT, 1 << 3);
        assert_eq!(*ejects.0.lock().unwrap(), [(0, 3)]);
        // Until the VMM empties the slot a second eject is not reported again.
        wr(&mut c, REG_EJECT, 1 << 3);
        assert_eq!(ejects.0.lock().unwrap().len(), 1);
        c.remove(0, 3).unwrap();
        assert_eq!(c.bus(0).unwrap().occupied, 0);
        // And the slot takes a new device.
        c.insert(0, 3).unwrap();
        assert_eq!(service(&mut c, 0), (1 << 3, 0));
    }

    #[test]
    fn surprise_removal_latches_a_bus_check() {
        let (mut c, irq, ejects) = controller();
        c.cold_plug(1, 0).unwrap();
        c.insert(0, 5).unwrap();
        c.request_eject(1, 0).unwrap();
        assert_eq!(irq.count(), 2);
        c.surprise_remove(1, 0).unwrap();
        c.surprise_remove(0, 5).unwrap();
        assert_eq!(irq.count(), 4);
        // The slots are empty and what was pending for them is gone with them.
        for bus in [0, 1] {
            let b = c.bus(bus).unwrap();
            assert_eq!((b.occupied, b.insert, b.remove), (0, 0, 0), "bus {bus}");
        }
        assert_eq!(service(&mut c, 1), (0, 0));
        wr(&mut c, REG_SELECT, 1);
        assert_eq!(rd(&mut c, REG_BUS_CHECK), 1);
        wr(&mut c, REG_BUS_CHECK, 1);
        assert_eq!(rd(&mut c, REG_BUS_CHECK), 0);
        wr(&mut c, REG_SELECT, 0);
        assert_eq!(rd(&mut c, REG_BUS_CHECK), 1 << 5);
        // Write-one-to-clear: a zero write keeps it, the guest cannot set bits.
        wr(&mut c, REG_BUS_CHECK, 0);
        wr(&mut c, REG_BUS_CHECK, 1 << 6);
        assert_eq!(rd(&mut c, REG_BUS_CHECK), 1 << 5);
        wr(&mut c, REG_BUS_CHECK, 1 << 5);
        assert_eq!(rd(&mut c, REG_BUS_CHECK), 0);
        // The eject of a vanished device is not reported; an empty slot cannot vanish again.
        wr(&mut c, REG_EJECT, 1 << 5);
        assert!(ejects.0.lock().unwrap().is_empty());
        assert_eq!(
            c.surprise_remove(0, 5),
            Err(AcpiHotplugError::Empty { bus: 0, slot: 5 })
        );
        // The slot takes a new device.
        c.insert(0, 5).unwrap();
        assert_eq!(service(&mut c, 0), (1 << 5, 0));
    }

    #[test]
    fn tracer_hears_every_register_access() {
        use crate::register_trace::testing::Recorder;
        let (mut c, _, _) = controller();
        let tracer = Arc::new(Recorder::default());
        c.set_tracer(Some(tracer.clone()));
        c.insert(0, 3).unwrap();
        service(&mut c, 0);
        let d = || TRACE_DEVICE.to_string();
        assert_eq!(
            tracer.take(),
            [
                (d(), "SELECT", true, 0, Some(0)),
                (d(), "INSERT", false, 1 << 3, None),
                (d(), "REMOVE", false, 0, None),
                (d(), "INSERT", true, 1 << 3, Some(0)),
                (d(), "REMOVE", true, 0, Some(0)),
            ]
        );
        // Accesses the controller does not decode are not register accesses.
        let mut b = [0u8; 2];
        c.pio_read(B, REG_INSERT, &mut b);
        assert!(tracer.take().is_empty());
    }

    #[test]
    fn the_pending_register_names_the_buses_with_news() {
        let (mut c, _, _) = controller();
        assert_eq!(rd(&mut c, REG_PENDING), 0);
        c.cold_plug(0, 7).unwrap();
        assert_eq!(
            rd(&mut c, REG_PENDING),
            0,
            "a cold-plugged device is no news"
        );
        c.insert(1, 0).unwrap();
        assert_eq!(rd(&mut c, REG_PENDING), 0b10);
        c.request_eject(0, 7).unwrap();
        // Whatever bus is selected, and the guest cannot write it.
        for select in [0, 1, 5] {
            wr(&mut c, REG_SELECT, select);
            wr(&mut c, REG_PENDING, 0);
            assert_eq!(rd(&mut c, REG_PENDING), 0b11, "select {select}");
        }
        // Reading it is not servicing a bus: that takes reading the bus's registers.
        assert_eq!(c.bus(0).unwrap().serviced, 0);
        assert_eq!(c.bus(1).unwrap().serviced, 0);
        // A bus drops out once all its events are acknowledged.
        service(&mut c, 1);
        assert_eq!(rd(&mut c, REG_PENDING), 0b01);
        service(&mut c, 0);
        assert_eq!(rd(&mut c, REG_PENDING), 0);
        // A bus check is news too.
        c.surprise_remove(0, 7).unwrap();
        assert_eq!(rd(&mut c, REG_PENDING), 0b01);
        wr(&mut c, REG_SELECT, 0);
        wr(&mut c, REG_BUS_CHECK, 1 << 7);
        assert_eq!(rd(&mut c, REG_PENDING), 0);
        // Only buses 0..=31 have a bit; the AML scans the others unasked.
        let irq = Arc::new(CountingInterrupt::default());
        let mut many = AcpiHotplugController::new(&[1; 40], irq);
        many.insert(32, 0).unwrap();
        assert_eq!(rd(&mut many, REG_PENDING), 0);
        many.insert(31, 0).unwrap();
        assert_eq!(rd(&mut many, REG_PENDING), 1 << 31);
    }

    #[test]
    fn pending_bits_are_write_one_to_clear_only() {
        let (mut c, _, _) = controller();
        c.insert(0, 1).unwrap();
        c.insert(0, 2).unwrap();
        wr(&mut c, REG_SELECT, 0);
        wr(&mut c, REG_INSERT, 0);
        assert_eq!(rd(&mut c, REG_INSERT), 0b110);
        // An event latched between the read and the acknowledgement survives it.
        let seen = rd(&mut c, REG_INSERT);
        c.insert(0, 4).unwrap();
        wr(&mut c, REG_INSERT, seen);
        assert_eq!(rd(&mut c, REG_INSERT), 1 << 4);
        // The guest cannot set bits or write the read-only eject register's value back.
        assert_eq!(rd(&mut c, REG_REMOVE), 0);
        assert_eq!(rd(&mut c, REG_EJECT), 0);
    }

    #[test]
    fn the_select_register_picks_the_bus() {
        let (mut c, _, ejects) = controller();
        c.insert(1, 0).unwrap();
        assert_eq!(service(&mut c, 0), (0, 0));
        assert_eq!(rd(&mut c, REG_SELECT), 0);
        assert_eq!(service(&mut c, 1), (1, 0));
        assert_eq!(rd(&mut c, REG_SELECT), 1);
        c.request_eject(1, 0).unwrap();
        // An eject written with the wrong bus selected does nothing.
        wr(&mut c, REG_SELECT, 0);
        wr(&mut c, REG_EJECT, 1);
        assert!(ejects.0.lock().unwrap().is_empty());
        wr(&mut c, REG_SELECT, 1);
        wr(&mut c, REG_EJECT, 1);
        assert_eq!(*ejects.0.lock().unwrap(), [(1, 0)]);
        // A selector naming no bus reads zeros and drops writes.
        for sel in [2, 255, 256, u32::MAX] {
            wr(&mut c, REG_SELECT, sel);
            assert_eq!(rd(&mut c, REG_SELECT), sel);
            assert_eq!(rd(&mut c, REG_INSERT), 0);
            assert_eq!(rd(&mut c, REG_REMOVE), 0);
            wr(&mut c, REG_EJECT, u32::MAX);
        }
        assert_eq!(ejects.0.lock().unwrap().len(), 1);
    }

    #[test]
    fn ejecting_an_empty_or_fixed_slot_is_ignored() {
        let (mut c, _, ejects) = controller();
        c.cold_plug(0, 5).unwrap();
        wr(&mut c, REG_SELECT, 0);
        // Slot 0 is not hot-pluggable (the host bridge lives there), 6 is empty.
        wr(&mut c, REG_EJECT, 1 << 0 | 1 << 6);
        assert!(ejects.0.lock().unwrap().is_empty());
        // A guest may eject a cold-plugged device without being asked (sysfs "power" = 0).
        wr(&mut c, REG_EJECT, u32::MAX);
        assert_eq!(*ejects.0.lock().unwrap(), [(0, 5)]);
    }

    #[test]
    fn vmm_requests_are_checked() {
        let (mut c, irq, _) = controller();
        assert_eq!(c.insert(2, 1), Err(AcpiHotplugError::NoSuchBus(2)));
        assert_eq!(
            c.insert(0, 0),
            Err(AcpiHotplugError::NotHotpluggable { bus: 0, slot: 0 })
        );
        assert_eq!(
            c.insert(0, 32),
            Err(AcpiHotplugError::NotHotpluggable { bus: 0, slot: 32 })
        );
        assert_eq!(
            c.request_eject(0, 1),
            Err(AcpiHotplugError::Empty { bus: 0, slot: 1 })
        );
        assert_eq!(
            c.remove(0, 1),
            Err(AcpiHotplugError::Empty { bus: 0, slot: 1 })
        );
        c.insert(0, 1).unwrap();
        assert_eq!(
            c.insert(0, 1),
            Err(AcpiHotplugError::Occupied { bus: 0, slot: 1 })
        );
        assert_eq!(
            c.cold_plug(0, 1),
            Err(AcpiHotplugError::Occupied { bus: 0, slot: 1 })
        );
        // Only the one good request raised the interrupt.
        assert_eq!(irq.count(), 1);
    }

    #[test]
    fn an_eject_request_replaces_a_pending_insert() {
        let (mut c, _, _) = controller();
        c.insert(0, 7).unwrap();
        c.request_eject(0, 7).unwrap();
        assert_eq!(service(&mut c, 0), (0, 1 << 7));
    }

    #[test]
    fn accesses_of_other_sizes_or_offsets_are_ignored() {
        let (mut c, _, ejects) = controller();
        c.insert(0, 1).unwrap();
        c.request_eject(0, 1).unwrap();
        let before = c.bus(0).copied();
        for off in 0..ACPI_HOTPLUG_PORTS + 4 {
            for len in 0..9usize {
                if len == 4 && off % 4 == 0 && off < ACPI_HOTPLUG_PORTS {
                    continue;
                }
                let mut b = vec![0u8; len];
                c.pio_read(B, off, &mut b);
                assert!(b.iter().all(|&x| x == 0xff), "read {len}@{off}");
                c.pio_write(B, off, &[0xff; 8][..len]);
            }
        }
        let pending = |s: Option<AcpiBusState>| s.map(|s| (s.occupied, s.remove, s.ejected));
        assert_eq!(pending(c.bus(0).copied()), pending(before));
        assert!(ejects.0.lock().unwrap().is_empty());
        assert!(c.ignored_accesses() > 0);
        // Offsets past the block but inside a 32-bit aligned read are ignored as well.
        let mut b = [0u8; 4];
        c.pio_read(B, ACPI_HOTPLUG_PORTS, &mut b);
        assert_eq!(b, [0xff; 4]);
    }

    /// An eject request the guest has not serviced yet survives a save and restore: the
    /// restored controller reports it to the event method and takes the `_EJ0`.
    #[test]
    fn a_pending_eject_request_survives_a_restore() {
        let (mut c, irq, _) = controller();
        c.insert(0, 3).unwrap();
        service(&mut c, 0);
        c.request_eject(0, 3).unwrap();
        wr(&mut c, REG_SELECT, 1);
        let state = c.state();

        let (mut r, r_irq, r_ejects) = controller();
        r.restore(&state).unwrap();
        assert_eq!(r.state(), state);
        assert_eq!(r_irq.count(), 0, "restoring raises nothing");
        assert_eq!(rd(&mut r, REG_SELECT), 1, "the guest's bus select");
        assert_eq!(service(&mut r, 0), (0, 1 << 3));
        wr(&mut r, REG_EJECT, 1 << 3);
        assert_eq!(*r_ejects.0.lock().unwrap(), [(0, 3)]);
        assert_eq!(irq.count(), 2);

        // Other buses are refused, changing nothing.
        let mut other =
            AcpiHotplugController::new(&[0xfffe], Arc::new(CountingInterrupt::default()));
        let before = other.state();
        assert!(other.restore(&state).is_err());
        assert_eq!(other.state(), before);
    }
}
