//! A PCI Express Root Port with one hot-plug slot: the function the guest's `pcieport` and
//! `pciehp` drivers bind to.
//!
//! # What the guest sees
//!
//! - A type 1 (PCI-to-PCI bridge) header, class 06/04/00, IDs 1b36:000c revision 0: QEMU's
//!   generic `pcie-root-port` (QEMU `docs/specs/pci-ids.rst`), which Linux knows no quirk for,
//!   unlike the Intel root ports (e.g. 8086:3420, QEMU's `ioh3420`) that pull in chipset quirks.
//!   Primary/secondary/subordinate bus numbers, the I/O, memory and 64-bit prefetchable windows
//!   and Bridge Control are writable, so the guest can number the bus behind the port and assign
//!   windows for a hot-added device's BARs. No BARs, Interrupt Pin 0 (no INTx).
//! - A PCI Express capability (id 0x10, version 2; PCI Express Base Spec 5.0 §7.5.3): Device/Port
//!   Type Root Port, Slot Implemented; Link Capabilities x1 at 2.5 GT/s with Data Link Layer Link
//!   Active Reporting Capable; Link Status x1 at 2.5 GT/s with Data Link Layer Link Active from the
//!   slot; Slot Capabilities, Slot Control and Slot Status from the [`HotplugSlot`].
//! - An MSI capability (id 0x05; PCI Local Bus Spec 3.0 §6.8.1): 64-bit address, one vector, no
//!   per-vector masking. The slot's hot-plug interrupt goes out as this MSI (PCIe Capabilities'
//!   Interrupt Message Number is 0), through an [`MsiSink`], only while MSI is enabled; a
//!   hot-plug interrupt that becomes due while MSI is disabled is dropped, but enabling MSI while
//!   the slot's interrupt is asserted sends it.
//! - A Power Management capability (id 0x01, version 3): D0 and D3hot only (writes of D1/D2 are
//!   ignored), No_Soft_Reset, no PME. Without PME Linux never relies on a wake-up from a
//!   suspended port.
//!
//! # Slot events
//!
//! A guest write to Slot Control is a command whose effects the VMM must act on — above all
//! [`SlotEvent::PowerOff`], after which (and only after which) the VMM releases a gracefully
//! removed device. [`PciDevice::config_write`] cannot return them, so the port hands every
//! [`SlotEvent`] to the [`SlotObserver`] set with [`PcieRootPort::set_observer`], called
//! synchronously on the thread of the guest's access *while the port is locked*: it must not
//! lock the port again (it queues work for another thread, or just records). That is the one
//! way events leave the port.
//!
//! The VMM's own operations ([`PcieRootPort::insert_card`] and friends) send the MSI themselves
//! when one is due.
//!
//! # Tracing
//!
//! With a [`RegisterTracer`] set ([`PcieRootPort::set_tracer`]) every guest access touching Slot
//! Control, Slot Status or Link Status is reported, one record per register touched.

use std::sync::Arc;

use super::configuration::PciConfigurationState;
use super::configuration::{
    PciConfiguration, PciIdentity, CAP_ID_MSI, CAP_ID_PCI_EXPRESS, CAP_ID_POWER_MANAGEMENT,
    CONFIG_SPACE_SIZE, IO_BASE, IO_LIMIT, MEMORY_BASE, MEMORY_LIMIT, PREFETCHABLE_BASE_UPPER32,
    PREFETCHABLE_LIMIT_UPPER32, PREFETCHABLE_MEMORY_BASE, PREFETCHABLE_MEMORY_LIMIT, PRIMARY_BUS,
    SECONDARY_BUS, SUBORDINATE_BUS,
};
use super::device::{ConfigWriteResult, PciDevice};
use super::slot::{HotplugSlot, HotplugSlotState, SlotCapabilities, SlotError, SlotEvent};
use crate::interrupt::{MsiMessage, MsiSink};
use crate::register_trace::{RegisterAccess, RegisterTracer};
use crate::state::StateError;

/// Vendor ID of the root port: Red Hat, Inc.
pub const ROOT_PORT_VENDOR_ID: u16 = 0x1b36;
/// Device ID of the root port: QEMU PCIe Root port.
pub const ROOT_PORT_DEVICE_ID: u16 = 0x000c;
/// Base class: bridge device.
pub const CLASS_BRIDGE: u8 = 0x06;
/// Sub-class of [`CLASS_BRIDGE`]: PCI-to-PCI bridge.
pub const SUBCLASS_PCI_TO_PCI: u8 = 0x04;

// ---- PCI Express Capability (PCI Express Base Spec 5.0 §7.5.3), offsets in the capability ----

/// Length of a version 2 PCI Express capability of a Root Port with a slot.
pub const PCIE_CAP_LEN: usize = 0x3c;
/// PCI Express Capabilities register (16 bits). §7.5.3.2.
pub const PCI_EXP_FLAGS: u16 = 0x02;
/// Device Capabilities (32 bits). §7.5.3.3.
pub const PCI_EXP_DEVCAP: u16 = 0x04;
/// Device Control (16 bits). §7.5.3.4.
pub const PCI_EXP_DEVCTL: u16 = 0x08;
/// Device Status (16 bits). §7.5.3.5.
pub const PCI_EXP_DEVSTA: u16 = 0x0a;
/// Link Capabilities (32 bits). §7.5.3.6.
pub const PCI_EXP_LNKCAP: u16 = 0x0c;
/// Link Control (16 bits). §7.5.3.7.
pub const PCI_EXP_LNKCTL: u16 = 0x10;
/// Link Status (16 bits). §7.5.3.8.
pub const PCI_EXP_LNKSTA: u16 = 0x12;
/// Slot Capabilities (32 bits). §7.5.3.9.
pub const PCI_EXP_SLTCAP: u16 = 0x14;
/// Slot Control (16 bits). §7.5.3.10.
pub const PCI_EXP_SLTCTL: u16 = 0x18;
/// Slot Status (16 bits). §7.5.3.11.
pub const PCI_EXP_SLTSTA: u16 = 0x1a;
/// Root Control (16 bits). §7.5.3.12.
pub const PCI_EXP_RTCTL: u16 = 0x1c;
/// Root Capabilities (16 bits). §7.5.3.13.
pub const PCI_EXP_RTCAP: u16 = 0x1e;
/// Root Status (32 bits). §7.5.3.14.
pub const PCI_EXP_RTSTA: u16 = 0x20;
/// Device Capabilities 2 (32 bits). §7.5.3.15.
pub const PCI_EXP_DEVCAP2: u16 = 0x24;
/// Device Control 2 (16 bits). §7.5.3.16.
pub const PCI_EXP_DEVCTL2: u16 = 0x28;
/// Link Capabilities 2 (32 bits). §7.5.3.18.
pub const PCI_EXP_LNKCAP2: u16 = 0x2c;
/// Link Control 2 (16 bits). §7.5.3.19.
pub const PCI_EXP_LNKCTL2: u16 = 0x30;
/// Link Status 2 (16 bits). §7.5.3.20.
pub const PCI_EXP_LNKSTA2: u16 = 0x32;
/// Slot Capabilities 2 (32 bits). §7.5.3.21.
pub const PCI_EXP_SLTCAP2: u16 = 0x34;

/// PCI Express Capabilities: Capability Version 2 (bits 3:0).
pub const PCI_EXP_FLAGS_VERSION_2: u16 = 0x2;
/// PCI Express Capabilities: Device/Port Type Root Port (bits 7:4 = 4).
pub const PCI_EXP_FLAGS_TYPE_ROOT_PORT: u16 = 0x4 << 4;
/// PCI Express Capabilities: Slot Implemented (bit 8).
pub const PCI_EXP_FLAGS_SLOT: u16 = 1 << 8;
/// Device Capabilities: Role-Based Error Reporting (bit 15).
pub const PCI_EXP_DEVCAP_RBER: u32 = 1 << 15;
/// Device Control bits the guest may change: error reporting enables (3:0), Relaxed Ordering
/// (4), Max_Payload_Size (7:5), No Snoop (11), Max_Read_Request_Size (14:12).
pub const PCI_EXP_DEVCTL_WRITABLE: u16 = 0x78ff;
/// Device Control after reset: Relaxed Ordering, No Snoop, 512-byte read requests.
pub const PCI_EXP_DEVCTL_RESET: u16 = 0x2810;
/// Device Status error bits (3:0), write-1-to-clear.
pub const PCI_EXP_DEVSTA_W1C: u16 = 0x000f;
/// Link speed 2.5 GT/s (Link Capabilities Max Link Speed, Link Status Current Link Speed).
pub const PCI_EXP_LINK_SPEED_2_5GT: u16 = 0x1;
/// Link width x1 (Link Capabilities bits 9:4, Link Status Negotiated Link Width bits 9:4).
pub const PCI_EXP_LINK_WIDTH_X1: u16 = 0x1 << 4;
/// Link Capabilities: Data Link Layer Link Active Reporting Capable (bit 20).
pub const PCI_EXP_LNKCAP_DLLLARC: u32 = 1 << 20;
/// Link Capabilities: Port Number field shift (bits 31:24).
pub const PCI_EXP_LNKCAP_PN_SHIFT: u32 = 24;
/// Link Control bits the guest may change: Link Disable (4, no effect here), Common Clock
/// Configuration (6), Extended Synch (7).
pub const PCI_EXP_LNKCTL_WRITABLE: u16 = 0x00d0;
/// Root Control bits the guest may change: system error enables (2:0), PME Interrupt Enable (3).
pub const PCI_EXP_RTCTL_WRITABLE: u16 = 0x000f;
/// Root Status: PME Status (bit 16), write-1-to-clear (never set: no PME).
pub const PCI_EXP_RTSTA_PME: u32 = 1 << 16;
/// Link Capabilities 2: Supported Link Speeds Vector with 2.5 GT/s only (bit 1).
pub const PCI_EXP_LNKCAP2_SLS_2_5GT: u32 = 1 << 1;
/// Link Control 2: Target Link Speed field (bits 3:0).
pub const PCI_EXP_LNKCTL2_TLS: u16 = 0x000f;

// ---- MSI Capability (PCI Local Bus Spec 3.0 §6.8.1), offsets in the capability ----

/// Length of a 64-bit MSI capability without per-vector masking.
pub const MSI_CAP_LEN: usize = 0x0e;
/// Message Control (16 bits).
pub const MSI_MESSAGE_CONTROL: u16 = 0x02;
/// Message Address, low dword (bits 1:0 reserved).
pub const MSI_ADDRESS_LOW: u16 = 0x04;
/// Message Upper Address.
pub const MSI_ADDRESS_HIGH: u16 = 0x08;
/// Message Data (16 bits) of a 64-bit capability.
pub const MSI_DATA_64: u16 = 0x0c;
/// Message Control: MSI Enable (bit 0).
pub const MSI_CONTROL_ENABLE: u16 = 1 << 0;
/// Message Control: 64 bit address capable (bit 7).
pub const MSI_CONTROL_64BIT: u16 = 1 << 7;

// ---- Power Management Capability (PCI Bus Power Management Interface Spec 1.2 §3.2) ----

/// Length of the Power Management capability.
pub const PM_CAP_LEN: usize = 8;
/// Power Management Capabilities (PMC, 16 bits).
pub const PM_PMC: u16 = 0x02;
/// Power Management Control/Status (PMCSR, 16 bits).
pub const PM_PMCSR: u16 = 0x04;
/// PMC: version 3 (PCI PM 1.2), no D1/D2, no PME.
pub const PM_PMC_VERSION_3: u16 = 0x3;
/// PMCSR: PowerState field (bits 1:0).
pub const PM_PMCSR_POWER_STATE: u16 = 0x3;
/// PMCSR: No_Soft_Reset (bit 3): D3hot to D0 keeps the state.
pub const PM_PMCSR_NO_SOFT_RESET: u16 = 1 << 3;

/// Learns of every [`SlotEvent`] as it happens. Called with the port locked: must not lock the
/// port.
pub trait SlotObserver: Send + Sync {
    /// The guest's Slot Control write on port `port_id` did `event`.
    fn slot_event(&self, port_id: &str, event: SlotEvent);
}

/// How to build a [`PcieRootPort`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RootPortOptions {
    /// Advertise native PCI Express hot-plug (Hot-Plug Capable and the slot's buttons,
    /// indicators and power controller). Without it the slot only reports presence and link,
    /// for ACPI hot-plug.
    pub native_hotplug: bool,
    /// Advertise No Command Completed Support: Command Completed is never set.
    pub no_command_completed: bool,
    /// Port Number in Link Capabilities.
    pub port_number: u8,
}

impl Default for RootPortOptions {
    /// Native hot-plug with Command Completed, port number 0.
    fn default() -> Self {
        RootPortOptions {
            native_hotplug: true,
            no_command_completed: false,
            port_number: 0,
        }
    }
}

/// A PCI Express Root Port with its hot-plug slot. See the module documentation.
pub struct PcieRootPort {
    id: String,
    config: PciConfiguration,
    slot: HotplugSlot,
    pcie_cap: u16,
    msi_cap: u16,
    pm_cap: u16,
    msi: Arc<dyn MsiSink>,
    observer: Option<Arc<dyn SlotObserver>>,
    tracer: Option<Arc<dyn RegisterTracer>>,
}

/// The registers of the PCI Express capability a trace reports, by offset in it.
const TRACED_REGISTERS: [(u16, &str); 3] = [
    (PCI_EXP_SLTCTL, "SLTCTL"),
    (PCI_EXP_SLTSTA, "SLTSTA"),
    (PCI_EXP_LNKSTA, "LNKSTA"),
];

impl std::fmt::Debug for PcieRootPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PcieRootPort")
            .field("id", &self.id)
            .field("slot", &self.slot)
            .field("msi_enabled", &self.msi_enabled())
            .finish_non_exhaustive()
    }
}

/// The value and byte mask a guest write of `data` at `start` gives the 16-bit register at
/// `reg`, or `None` if it does not touch the register. Unwritten bytes are 0 in the value.
fn written_u16(reg: u16, start: u16, data: &[u8]) -> Option<(u16, u16)> {
    let mut value = 0u16;
    let mut mask = 0u16;
    for i in 0..2u16 {
        let Some(index) = (reg + i).checked_sub(start) else {
            continue;
        };
        if let Some(&byte) = data.get(usize::from(index)) {
            value |= u16::from(byte) << (8 * i);
            mask |= 0xff << (8 * i);
        }
    }
    (mask != 0).then_some((value, mask))
}

impl PcieRootPort {
    /// A root port named `id` whose slot has Physical Slot Number `physical_slot` (13 bits),
    /// raising its hot-plug interrupt through `msi`. The slot starts empty.
    pub fn new(
        id: impl Into<String>,
        physical_slot: u16,
        options: RootPortOptions,
        msi: Arc<dyn MsiSink>,
    ) -> Self {
        let identity = PciIdentity {
            vendor_id: ROOT_PORT_VENDOR_ID,
            device_id: ROOT_PORT_DEVICE_ID,
            revision_id: 0,
            class_code: CLASS_BRIDGE,
            subclass: SUBCLASS_PCI_TO_PCI,
            prog_if: 0,
            multifunction: false,
        };
        let mut caps = if options.native_hotplug {
            SlotCapabilities::native(physical_slot)
        } else {
            SlotCapabilities::without_native_hotplug(physical_slot)
        };
        if options.no_command_completed {
            caps.no_command_completed = true;
        }
        let slot = HotplugSlot::new(caps);
        let mut config = PciConfiguration::new_type1(&identity);

        let (body, writable, w1c) = Self::pcie_capability(&slot, options.port_number);
        // The three capabilities fit in 256 bytes by construction: these cannot fail.
        let pcie_cap = config
            .add_capability_with_masks(CAP_ID_PCI_EXPRESS, &body, &writable, &w1c)
            .unwrap_or_default();
        let (body, writable) = Self::msi_capability();
        let msi_cap = config
            .add_capability_with_masks(CAP_ID_MSI, &body, &writable, &[])
            .unwrap_or_default();
        let (body, writable) = Self::pm_capability();
        let pm_cap = config
            .add_capability_with_masks(CAP_ID_POWER_MANAGEMENT, &body, &writable, &[])
            .unwrap_or_default();

        let mut port = PcieRootPort {
            id: id.into(),
            config,
            slot,
            pcie_cap,
            msi_cap,
            pm_cap,
            msi,
            observer: None,
            tracer: None,
        };
        port.sync_slot_registers();
        port
    }

    /// The PCI Express capability body and its writable and write-1-to-clear masks. Slot
    /// Control, Slot Status and Link Status are read-only in the masks: the port forwards guest
    /// writes to them to the slot.
    fn pcie_capability(
        slot: &HotplugSlot,
        port_number: u8,
    ) -> ([u8; PCIE_CAP_LEN], [u8; PCIE_CAP_LEN], [u8; PCIE_CAP_LEN]) {
        let mut body = [0u8; PCIE_CAP_LEN];
        let mut writable = [0u8; PCIE_CAP_LEN];
        let mut w1c = [0u8; PCIE_CAP_LEN];
        let put16 = |buf: &mut [u8; PCIE_CAP_LEN], at: u16, v: u16| {
            let at = usize::from(at);
            buf[at..at + 2].copy_from_slice(&v.to_le_bytes());
        };
        let put32 = |buf: &mut [u8; PCIE_CAP_LEN], at: u16, v: u32| {
            let at = usize::from(at);
            buf[at..at + 4].copy_from_slice(&v.to_le_bytes());
        };
        put16(
            &mut body,
            PCI_EXP_FLAGS,
            PCI_EXP_FLAGS_VERSION_2 | PCI_EXP_FLAGS_TYPE_ROOT_PORT | PCI_EXP_FLAGS_SLOT,
        );
        put32(&mut body, PCI_EXP_DEVCAP, PCI_EXP_DEVCAP_RBER);
        put16(&mut body, PCI_EXP_DEVCTL, PCI_EXP_DEVCTL_RESET);
        put16(&mut writable, PCI_EXP_DEVCTL, PCI_EXP_DEVCTL_WRITABLE);
        put16(&mut w1c, PCI_EXP_DEVSTA, PCI_EXP_DEVSTA_W1C);
        put32(
            &mut body,
            PCI_EXP_LNKCAP,
            u32::from(PCI_EXP_LINK_SPEED_2_5GT | PCI_EXP_LINK_WIDTH_X1)
                | PCI_EXP_LNKCAP_DLLLARC
                | (u32::from(port_number) << PCI_EXP_LNKCAP_PN_SHIFT),
        );
        put16(&mut writable, PCI_EXP_LNKCTL, PCI_EXP_LNKCTL_WRITABLE);
        put32(&mut body, PCI_EXP_SLTCAP, slot.slot_capabilities());
        put16(&mut writable, PCI_EXP_RTCTL, PCI_EXP_RTCTL_WRITABLE);
        put32(&mut w1c, PCI_EXP_RTSTA, PCI_EXP_RTSTA_PME);
        put32(&mut body, PCI_EXP_LNKCAP2, PCI_EXP_LNKCAP2_SLS_2_5GT);
        put16(&mut body, PCI_EXP_LNKCTL2, PCI_EXP_LINK_SPEED_2_5GT);
        put16(&mut writable, PCI_EXP_LNKCTL2, PCI_EXP_LNKCTL2_TLS);
        (body, writable, w1c)
    }

    fn msi_capability() -> ([u8; MSI_CAP_LEN], [u8; MSI_CAP_LEN]) {
        let mut body = [0u8; MSI_CAP_LEN];
        body[2..4].copy_from_slice(&MSI_CONTROL_64BIT.to_le_bytes());
        let mut writable = [0u8; MSI_CAP_LEN];
        writable[2..4].copy_from_slice(&MSI_CONTROL_ENABLE.to_le_bytes());
        writable[4..8].copy_from_slice(&0xffff_fffcu32.to_le_bytes());
        writable[8..14].fill(0xff);
        (body, writable)
    }

    fn pm_capability() -> ([u8; PM_CAP_LEN], [u8; PM_CAP_LEN]) {
        let mut body = [0u8; PM_CAP_LEN];
        body[2..4].copy_from_slice(&PM_PMC_VERSION_3.to_le_bytes());
        body[4..6].copy_from_slice(&PM_PMCSR_NO_SOFT_RESET.to_le_bytes());
        let mut writable = [0u8; PM_CAP_LEN];
        writable[4..6].copy_from_slice(&PM_PMCSR_POWER_STATE.to_le_bytes());
        (body, writable)
    }

    /// Copies the slot's registers into configuration space.
    fn sync_slot_registers(&mut self) {
        let cap = self.pcie_cap;
        self.config
            .set_u16(cap + PCI_EXP_SLTCTL, self.slot.slot_control());
        self.config
            .set_u16(cap + PCI_EXP_SLTSTA, self.slot.slot_status());
        self.config.set_u16(
            cap + PCI_EXP_LNKSTA,
            PCI_EXP_LINK_SPEED_2_5GT | PCI_EXP_LINK_WIDTH_X1 | self.slot.link_status_bits(),
        );
    }

    /// After a slot operation: registers, and the MSI if one is due.
    fn after_slot_change(&mut self) {
        self.sync_slot_registers();
        if self.slot.take_interrupt() {
            self.send_msi();
        }
    }

    fn send_msi(&self) {
        if !self.msi_enabled() {
            log::debug!("{}: hot-plug interrupt dropped: MSI disabled", self.id);
            return;
        }
        if let Err(e) = self.msi.send(self.msi_message()) {
            // The guest programmed the message: a refusal is the guest's to repeat.
            crate::guest_log::report(
                "hot-plug MSI refused",
                log::Level::Warn,
                format_args!("{}: hot-plug MSI refused: {e}", self.id),
            );
        }
    }

    fn record_event(&mut self, event: SlotEvent) {
        if let Some(observer) = &self.observer {
            observer.slot_event(&self.id, event);
        }
    }

    // ---- The VMM's side ----

    /// Sets (or clears) the observer of slot events.
    pub fn set_observer(&mut self, observer: Option<Arc<dyn SlotObserver>>) {
        self.observer = observer;
    }

    /// Sets (or clears) who hears of the guest's accesses to the slot and link registers.
    pub fn set_tracer(&mut self, tracer: Option<Arc<dyn RegisterTracer>>) {
        self.tracer = tracer;
    }

    /// Reports the guest access of `len` bytes at `offset` to the tracer, one record per traced
    /// register it touches; `written` is the data of a write.
    fn trace(&self, offset: u16, len: usize, written: Option<&[u8]>) {
        let Some(tracer) = &self.tracer else {
            return;
        };
        let end = usize::from(offset) + len;
        for (reg, name) in TRACED_REGISTERS {
            let at = self.pcie_cap + reg;
            if usize::from(at) + 2 <= usize::from(offset) || usize::from(at) >= end {
                continue;
            }
            let now = u32::from(self.config.read_u16(at));
            let access = match written {
                None => RegisterAccess {
                    device: &self.id,
                    register: name,
                    write: false,
                    value: now,
                    after: None,
                },
                Some(data) => RegisterAccess {
                    device: &self.id,
                    register: name,
                    write: true,
                    value: written_u16(at, offset, data).map_or(0, |(v, _)| u32::from(v)),
                    after: Some(now),
                },
            };
            tracer.access(&access);
        }
    }

    /// The slot, for diagnostics (presence, power, indicators, whether the guest armed it,
    /// pending events).
    pub fn slot(&self) -> &HotplugSlot {
        &self.slot
    }

    /// A card present from the start (cold plug): no events, no interrupt.
    pub fn cold_plug_card(&mut self) -> Result<(), SlotError> {
        self.slot.cold_plug()?;
        self.after_slot_change();
        Ok(())
    }

    /// Hot-add ([`HotplugSlot::insert`]); sends the MSI if one is due. The device must be
    /// reachable behind the port before this is called: the guest may probe it at once.
    pub fn insert_card(&mut self) -> Result<(), SlotError> {
        self.slot.insert()?;
        self.after_slot_change();
        Ok(())
    }

    /// Asks the guest to remove the card ([`HotplugSlot::press_attention_button`]); sends the
    /// MSI if one is due. Wait for [`SlotEvent::PowerOff`] before releasing the device.
    pub fn press_attention_button(&mut self) {
        self.slot.press_attention_button();
        self.after_slot_change();
    }

    /// Surprise removal ([`HotplugSlot::surprise_remove`]); sends the MSI if one is due.
    pub fn surprise_remove(&mut self) -> Result<(), SlotError> {
        self.slot.surprise_remove()?;
        self.after_slot_change();
        Ok(())
    }

    /// The card is taken out after the guest powered the slot off
    /// ([`HotplugSlot::remove_card`]); sends the MSI if one is due.
    pub fn remove_card(&mut self) -> Result<(), SlotError> {
        self.slot.remove_card()?;
        self.after_slot_change();
        Ok(())
    }

    /// The configuration space, for inspection.
    pub fn config(&self) -> &PciConfiguration {
        &self.config
    }

    /// Offset of the PCI Express capability.
    pub fn pcie_capability_offset(&self) -> u16 {
        self.pcie_cap
    }

    /// Offset of the MSI capability.
    pub fn msi_capability_offset(&self) -> u16 {
        self.msi_cap
    }

    /// Offset of the Power Management capability.
    pub fn pm_capability_offset(&self) -> u16 {
        self.pm_cap
    }

    /// Whether the guest enabled MSI.
    pub fn msi_enabled(&self) -> bool {
        self.config.read_u16(self.msi_cap + MSI_MESSAGE_CONTROL) & MSI_CONTROL_ENABLE != 0
    }

    /// The MSI message the guest programmed.
    pub fn msi_message(&self) -> MsiMessage {
        let low = u64::from(self.config.read_u32(self.msi_cap + MSI_ADDRESS_LOW));
        let high = u64::from(self.config.read_u32(self.msi_cap + MSI_ADDRESS_HIGH));
        MsiMessage {
            address: (high << 32) | low,
            data: u32::from(self.config.read_u16(self.msi_cap + MSI_DATA_64)),
        }
    }

    /// Primary Bus Number.
    pub fn primary_bus(&self) -> u8 {
        self.config.read_u8(PRIMARY_BUS)
    }

    /// Secondary Bus Number: the bus behind the port, where the slot's device is device 0.
    pub fn secondary_bus(&self) -> u8 {
        self.config.read_u8(SECONDARY_BUS)
    }

    /// Subordinate Bus Number: the highest bus behind the port.
    pub fn subordinate_bus(&self) -> u8 {
        self.config.read_u8(SUBORDINATE_BUS)
    }

    /// The I/O window `(base, limit)` (limit inclusive), or `None` if disabled (base > limit).
    pub fn io_window(&self) -> Option<(u64, u64)> {
        let base = u64::from(self.config.read_u8(IO_BASE) & 0xf0) << 8;
        let limit = (u64::from(self.config.read_u8(IO_LIMIT) & 0xf0) << 8) | 0xfff;
        (base <= limit).then_some((base, limit))
    }

    /// The memory window `(base, limit)` (limit inclusive), or `None` if disabled.
    pub fn memory_window(&self) -> Option<(u64, u64)> {
        let base = u64::from(self.config.read_u16(MEMORY_BASE) & 0xfff0) << 16;
        let limit = (u64::from(self.config.read_u16(MEMORY_LIMIT) & 0xfff0) << 16) | 0xf_ffff;
        (base <= limit).then_some((base, limit))
    }

    /// Programs the memory window to `[base, limit]` as firmware does before the guest runs
    /// (the guest may reprogram it). The window is 1 MiB granular: the low 20 bits of `base`
    /// and `limit` are not stored, and only 32-bit addresses can be expressed.
    pub fn set_memory_window(&mut self, base: u32, limit: u32) {
        self.config
            .set_u16(MEMORY_BASE, (base >> 16) as u16 & 0xfff0);
        self.config
            .set_u16(MEMORY_LIMIT, (limit >> 16) as u16 & 0xfff0);
    }

    /// The 64-bit prefetchable memory window `(base, limit)` (limit inclusive), or `None` if
    /// disabled.
    pub fn prefetchable_window(&self) -> Option<(u64, u64)> {
        let base = (u64::from(self.config.read_u16(PREFETCHABLE_MEMORY_BASE) & 0xfff0) << 16)
            | (u64::from(self.config.read_u32(PREFETCHABLE_BASE_UPPER32)) << 32);
        let limit = (u64::from(self.config.read_u16(PREFETCHABLE_MEMORY_LIMIT) & 0xfff0) << 16)
            | (u64::from(self.config.read_u32(PREFETCHABLE_LIMIT_UPPER32)) << 32)
            | 0xf_ffff;
        (base <= limit).then_some((base, limit))
    }
}

impl PciDevice for PcieRootPort {
    fn id(&self) -> &str {
        &self.id
    }

    /// The Secondary Bus Number while the slot's link is up and the guest has numbered the bus.
    fn downstream_bus(&self) -> Option<u8> {
        let bus = self.secondary_bus();
        (bus != 0 && self.slot.is_link_active()).then_some(bus)
    }

    fn config_read(&mut self, offset: u16, data: &mut [u8]) {
        self.config.read(offset, data);
        self.trace(offset, data.len(), None);
    }

    fn config_write(&mut self, offset: u16, data: &[u8]) -> ConfigWriteResult {
        let in_range = usize::from(offset)
            .checked_add(data.len())
            .is_some_and(|end| !data.is_empty() && end <= CONFIG_SPACE_SIZE);
        if !in_range {
            return ConfigWriteResult::default();
        }
        let msi_was_enabled = self.msi_enabled();
        let pmcsr_before = self.config.read_u16(self.pm_cap + PM_PMCSR);

        // Everything but the slot registers, through the masks (the slot registers are
        // read-only there). A bridge has no BARs, so this never reprograms any.
        let reprograms = self.config.write(offset, data);

        // PMCSR: only D0 and D3hot exist; a write of D1 or D2 is ignored (PCI PM 1.2 §3.2.4).
        let pmcsr = self.config.read_u16(self.pm_cap + PM_PMCSR);
        if matches!(pmcsr & PM_PMCSR_POWER_STATE, 1 | 2) {
            self.config.set_u16(self.pm_cap + PM_PMCSR, pmcsr_before);
        }

        // Slot Status first (write-1-to-clear), then Slot Control (a command, which may set
        // Command Completed): a dword write clearing CC and issuing a command leaves CC set.
        let cap = self.pcie_cap;
        if let Some((value, _)) = written_u16(cap + PCI_EXP_SLTSTA, offset, data) {
            self.slot.write_status(value);
        }
        if let Some((value, mask)) = written_u16(cap + PCI_EXP_SLTCTL, offset, data) {
            let value = (self.slot.slot_control() & !mask) | (value & mask);
            for event in self.slot.write_control(value) {
                self.record_event(event);
            }
        }
        self.after_slot_change();

        // MSI enabled while the hot-plug interrupt is asserted: send it now (§6.7.3.4).
        if !msi_was_enabled && self.msi_enabled() && self.slot.interrupt_asserted() {
            self.send_msi();
        }
        self.trace(offset, data.len(), Some(data));
        reprograms.into()
    }
}

/// The saved state of a [`PcieRootPort`]: its configuration space and its slot.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PcieRootPortState {
    /// Configuration space.
    pub config: PciConfigurationState,
    /// The hot-plug slot.
    pub slot: HotplugSlotState,
}

impl PcieRootPort {
    /// The port's state now.
    pub fn state(&self) -> PcieRootPortState {
        PcieRootPortState {
            config: self.config.state(),
            slot: self.slot.state(),
        }
    }

    /// Puts `state` back, refused (changing nothing) if it is not a root port's like this one.
    /// Nothing is signalled: the guest finds the registers as they were, and an interrupt that
    /// was on its way is in the interrupt controller's own state.
    pub fn restore(&mut self, state: &PcieRootPortState) -> Result<(), StateError> {
        self.config.restore(&self.id, &state.config)?;
        self.slot.restore(&state.slot);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::super::configuration::{
        BRIDGE_CONTROL, CAPABILITIES_POINTER, COMMAND, CONFIG_SPACE_SIZE, HEADER_TYPE,
        INTERRUPT_PIN,
    };
    use super::super::slot::*;
    use super::*;
    use std::io;

    #[derive(Default)]
    struct RecordingMsi {
        sent: Mutex<Vec<MsiMessage>>,
    }

    impl RecordingMsi {
        fn count(&self) -> usize {
            self.sent.lock().unwrap().len()
        }
    }

    impl MsiSink for RecordingMsi {
        fn send(&self, message: MsiMessage) -> io::Result<()> {
            self.sent.lock().unwrap().push(message);
            Ok(())
        }
    }

    #[derive(Default)]
    struct RecordingObserver {
        seen: Mutex<Vec<(String, SlotEvent)>>,
    }

    impl SlotObserver for RecordingObserver {
        fn slot_event(&self, port_id: &str, event: SlotEvent) {
            self.seen.lock().unwrap().push((port_id.to_string(), event));
        }
    }

    /// A port with its MSI recorder and slot event observer, with the guest's view of
    /// configuration space.
    struct Guest {
        port: PcieRootPort,
        msi: Arc<RecordingMsi>,
        observer: Arc<RecordingObserver>,
    }

    impl Guest {
        fn new(options: RootPortOptions) -> Self {
            let msi = Arc::new(RecordingMsi::default());
            let observer = Arc::new(RecordingObserver::default());
            let mut port = PcieRootPort::new("rp1", 7, options, msi.clone());
            port.set_observer(Some(observer.clone()));
            Guest {
                port,
                msi,
                observer,
            }
        }

        /// The slot events the observer heard since the last call, oldest first.
        fn take_events(&mut self) -> Vec<SlotEvent> {
            let mut seen = self.observer.seen.lock().unwrap();
            assert!(
                seen.iter().all(|(id, _)| id == "rp1"),
                "tagged with the port id"
            );
            seen.drain(..).map(|(_, e)| e).collect()
        }

        fn read16(&mut self, offset: u16) -> u16 {
            let mut b = [0u8; 2];
            self.port.config_read(offset, &mut b);
            u16::from_le_bytes(b)
        }

        fn read32(&mut self, offset: u16) -> u32 {
            let mut b = [0u8; 4];
            self.port.config_read(offset, &mut b);
            u32::from_le_bytes(b)
        }

        fn write16(&mut self, offset: u16, value: u16) {
            assert!(self
                .port
                .config_write(offset, &value.to_le_bytes())
                .is_empty());
        }

        fn write32(&mut self, offset: u16, value: u32) {
            assert!(self
                .port
                .config_write(offset, &value.to_le_bytes())
                .is_empty());
        }

        fn exp(&self, reg: u16) -> u16 {
            self.port.pcie_capability_offset() + reg
        }

        /// `pcie_capability_read_word`.
        fn cap_read16(&mut self, reg: u16) -> u16 {
            let at = self.exp(reg);
            self.read16(at)
        }

        /// `pcie_capability_write_word`.
        fn cap_write16(&mut self, reg: u16, value: u16) {
            let at = self.exp(reg);
            self.write16(at, value);
        }

        /// pciehp's `pcie_do_write_cmd`: read-modify-write of Slot Control.
        fn write_cmd(&mut self, cmd: u16, mask: u16) {
            let ctl = self.cap_read16(PCI_EXP_SLTCTL);
            self.cap_write16(PCI_EXP_SLTCTL, (ctl & !mask) | (cmd & mask));
        }

        /// pciehp's `pciehp_isr` in MSI mode: read Slot Status, write the event bits back until
        /// none is left; returns the events seen.
        fn isr(&mut self) -> u16 {
            let mut events = 0;
            loop {
                let status = self.cap_read16(PCI_EXP_SLTSTA)
                    & (SLTSTA_ABP | SLTSTA_PFD | SLTSTA_PDC | SLTSTA_CC | SLTSTA_DLLSC);
                if status == 0 {
                    return events;
                }
                events |= status;
                self.cap_write16(PCI_EXP_SLTSTA, status);
            }
        }

        /// The port driver programs and enables MSI.
        fn enable_msi(&mut self) {
            let msi = self.port.msi_capability_offset();
            self.write32(msi + MSI_ADDRESS_LOW, 0xfee0_0000);
            self.write32(msi + MSI_ADDRESS_HIGH, 0);
            self.write16(msi + MSI_DATA_64, 0x4041);
            let ctl = self.read16(msi + MSI_MESSAGE_CONTROL);
            self.write16(msi + MSI_MESSAGE_CONTROL, ctl | MSI_CONTROL_ENABLE);
        }

        /// pciehp's probe: `pcie_init` then `pcie_enable_notification`. Returns the Slot Control
        /// value written.
        fn pciehp_probe(&mut self) -> u16 {
            let sltcap = self.read32(self.exp(PCI_EXP_SLTCAP));
            assert_ne!(sltcap & SLTCAP_HPC, 0);
            // Clear all remaining event bits.
            self.cap_write16(
                PCI_EXP_SLTSTA,
                SLTSTA_ABP | SLTSTA_PFD | SLTSTA_MRLSC | SLTSTA_CC | SLTSTA_DLLSC | SLTSTA_PDC,
            );
            // Attention button present: ABPE, not PDCE.
            let mut cmd = SLTCTL_DLLSCE | SLTCTL_HPIE;
            cmd |= if sltcap & SLTCAP_ABP != 0 {
                SLTCTL_ABPE
            } else {
                SLTCTL_PDCE
            };
            if sltcap & SLTCAP_NCCS == 0 {
                cmd |= SLTCTL_CCIE;
            }
            let mask =
                SLTCTL_PDCE | SLTCTL_ABPE | SLTCTL_PFDE | SLTCTL_HPIE | SLTCTL_CCIE | SLTCTL_DLLSCE;
            self.write_cmd(cmd, mask);
            cmd
        }
    }

    fn set_pic(g: &mut Guest, indicator: Indicator) {
        g.write_cmd(indicator.bits() << SLTCTL_PIC_SHIFT, SLTCTL_PIC);
    }

    #[test]
    fn tracer_hears_slot_and_link_register_accesses() {
        use crate::register_trace::testing::Recorder;
        let mut g = Guest::new(RootPortOptions::default());
        let tracer = Arc::new(Recorder::default());
        g.port.set_tracer(Some(tracer.clone()));
        // Accesses elsewhere are not traced.
        g.read32(0);
        g.write16(0x04, 0x0006);
        assert!(tracer.take().is_empty());
        g.port.insert_card().unwrap();
        let status = g.cap_read16(PCI_EXP_SLTSTA);
        assert_eq!(
            tracer.take(),
            [("rp1".to_string(), "SLTSTA", false, u32::from(status), None)]
        );
        // Write-1-to-clear: the record carries the value written and what is left.
        g.cap_write16(PCI_EXP_SLTSTA, SLTSTA_PDC);
        let after = u32::from(g.port.slot().slot_status());
        assert_eq!(
            tracer.take(),
            [(
                "rp1".to_string(),
                "SLTSTA",
                true,
                u32::from(SLTSTA_PDC),
                Some(after)
            )]
        );
        // A dword read at Slot Control covers Slot Control and Slot Status.
        let at = g.exp(PCI_EXP_SLTCTL);
        g.read32(at);
        let seen: Vec<_> = tracer.take().into_iter().map(|r| r.1).collect();
        assert_eq!(seen, ["SLTCTL", "SLTSTA"]);
        g.cap_read16(PCI_EXP_LNKSTA);
        assert_eq!(tracer.take()[0].1, "LNKSTA");
        g.port.set_tracer(None);
        g.cap_read16(PCI_EXP_LNKSTA);
        assert!(tracer.take().is_empty());
    }

    #[test]
    fn identity_and_header() {
        let mut g = Guest::new(RootPortOptions::default());
        assert_eq!(g.read32(0x00), 0x000c_1b36);
        assert_eq!(g.read32(0x08), 0x0604_0000);
        assert_eq!(g.port.config().read_u8(HEADER_TYPE), 0x01);
        assert_eq!(g.port.config().read_u8(INTERRUPT_PIN), 0);
        assert_eq!(g.port.id(), "rp1");
        assert!(g.port.decoded_bars().is_empty());
        let c = g.port.config();
        assert_eq!(
            c.find_capability(CAP_ID_PCI_EXPRESS),
            Some(g.port.pcie_capability_offset())
        );
        assert_eq!(
            c.find_capability(CAP_ID_MSI),
            Some(g.port.msi_capability_offset())
        );
        assert_eq!(
            c.find_capability(CAP_ID_POWER_MANAGEMENT),
            Some(g.port.pm_capability_offset())
        );
        assert_eq!(c.read_u8(CAPABILITIES_POINTER), 0x40);
        // Identity is read-only.
        g.write32(0, 0);
        assert_eq!(g.read32(0x00), 0x000c_1b36);
    }

    #[test]
    fn pcie_capability_registers() {
        let mut g = Guest::new(RootPortOptions {
            port_number: 3,
            ..Default::default()
        });
        assert_eq!(g.cap_read16(PCI_EXP_FLAGS), 0x0142);
        let lnkcap = g.read32(g.exp(PCI_EXP_LNKCAP));
        assert_eq!(lnkcap, 0x0310_0011);
        // Empty slot: link down, but speed and width still read x1 at 2.5 GT/s.
        assert_eq!(g.cap_read16(PCI_EXP_LNKSTA), 0x0011);
        let sltcap = g.read32(g.exp(PCI_EXP_SLTCAP));
        assert_eq!(sltcap, 0x7b | (7 << 19));
        assert_eq!(g.cap_read16(PCI_EXP_SLTCTL), 0x07c0);
        assert_eq!(g.cap_read16(PCI_EXP_SLTSTA), 0);
        assert_eq!(g.read32(g.exp(PCI_EXP_LNKCAP2)), 0x2);
        assert_eq!(g.read32(g.exp(PCI_EXP_SLTCAP2)), 0);
        assert_eq!(g.cap_read16(PCI_EXP_RTCAP), 0);
        assert_eq!(g.read32(g.exp(PCI_EXP_DEVCAP2)), 0);
        // Read-only registers ignore writes; Link Status too.
        g.write32(g.exp(PCI_EXP_SLTCAP), 0);
        g.cap_write16(PCI_EXP_LNKSTA, 0xffff);
        assert_eq!(g.read32(g.exp(PCI_EXP_SLTCAP)), sltcap);
        assert_eq!(g.cap_read16(PCI_EXP_LNKSTA), 0x0011);
        // Device Control, Link Control, Root Control: writable bits only.
        g.cap_write16(PCI_EXP_DEVCTL, 0xffff);
        assert_eq!(g.cap_read16(PCI_EXP_DEVCTL), PCI_EXP_DEVCTL_WRITABLE);
        g.cap_write16(PCI_EXP_LNKCTL, 0xffff);
        assert_eq!(g.cap_read16(PCI_EXP_LNKCTL), PCI_EXP_LNKCTL_WRITABLE);
        g.cap_write16(PCI_EXP_RTCTL, 0xffff);
        assert_eq!(g.cap_read16(PCI_EXP_RTCTL), PCI_EXP_RTCTL_WRITABLE);
        g.cap_write16(PCI_EXP_DEVCTL2, 0xffff);
        assert_eq!(g.cap_read16(PCI_EXP_DEVCTL2), 0);
        assert_eq!(g.cap_read16(PCI_EXP_LNKCTL2), 1);
        assert_eq!(g.cap_read16(PCI_EXP_LNKSTA2), 0);
    }

    #[test]
    fn options() {
        let mut nccs = Guest::new(RootPortOptions {
            no_command_completed: true,
            ..Default::default()
        });
        let sltcap = nccs.read32(nccs.exp(PCI_EXP_SLTCAP));
        assert_eq!(sltcap & SLTCAP_NCCS, SLTCAP_NCCS);
        nccs.enable_msi();
        let written = nccs.pciehp_probe();
        assert_eq!(written & SLTCTL_CCIE, 0);
        assert_eq!(nccs.cap_read16(PCI_EXP_SLTSTA) & SLTSTA_CC, 0);
        assert_eq!(nccs.msi.count(), 0);

        let mut acpi = Guest::new(RootPortOptions {
            native_hotplug: false,
            ..Default::default()
        });
        let sltcap = acpi.read32(acpi.exp(PCI_EXP_SLTCAP));
        assert_eq!(
            sltcap & (SLTCAP_HPC | SLTCAP_HPS | SLTCAP_ABP | SLTCAP_PCP),
            0
        );
        assert_eq!(sltcap >> SLTCAP_PSN_SHIFT, 7);
        assert_eq!(
            acpi.cap_read16(PCI_EXP_FLAGS) & PCI_EXP_FLAGS_SLOT,
            PCI_EXP_FLAGS_SLOT
        );
        acpi.port.cold_plug_card().unwrap();
        assert_eq!(acpi.cap_read16(PCI_EXP_SLTSTA), SLTSTA_PDS);
        assert_eq!(acpi.cap_read16(PCI_EXP_LNKSTA) & LNKSTA_DLLLA, LNKSTA_DLLLA);
    }

    #[test]
    fn downstream_bus_needs_a_bus_number_and_a_link() {
        let mut g = Guest::new(RootPortOptions::default());
        assert_eq!(g.port.downstream_bus(), None);
        g.port.insert_card().unwrap();
        assert_eq!(g.port.downstream_bus(), None, "bus not numbered yet");
        g.write32(PRIMARY_BUS, 0x0003_0300);
        assert_eq!(g.port.downstream_bus(), Some(3));
        // The guest powers the slot on, then off: the link goes down, the card stops answering.
        let ctl = g.cap_read16(PCI_EXP_SLTCTL);
        g.cap_write16(PCI_EXP_SLTCTL, ctl & !SLTCTL_PCC);
        assert_eq!(g.port.downstream_bus(), Some(3));
        g.cap_write16(PCI_EXP_SLTCTL, ctl | SLTCTL_PCC);
        assert_eq!(g.port.downstream_bus(), None);
        g.cap_write16(PCI_EXP_SLTCTL, ctl & !SLTCTL_PCC);
        assert_eq!(g.port.downstream_bus(), Some(3));
        g.port.surprise_remove().unwrap();
        assert_eq!(g.port.downstream_bus(), None);
    }

    #[test]
    fn bridge_windows_and_bus_numbers() {
        let mut g = Guest::new(RootPortOptions::default());
        assert_eq!(g.port.io_window(), None);
        assert_eq!(g.port.memory_window(), None);
        assert_eq!(g.port.prefetchable_window(), None);
        g.write32(PRIMARY_BUS, 0x0002_0100);
        assert_eq!(
            (
                g.port.primary_bus(),
                g.port.secondary_bus(),
                g.port.subordinate_bus()
            ),
            (0, 1, 2)
        );
        g.write16(IO_BASE, 0x2010);
        assert_eq!(g.port.io_window(), Some((0x1000, 0x2fff)));
        g.write32(MEMORY_BASE, 0xfe10_fe00);
        assert_eq!(g.port.memory_window(), Some((0xfe00_0000, 0xfe1f_ffff)));
        // Firmware's programming reads back the same, 1 MiB granular; the guest sees it.
        g.port.set_memory_window(0xc020_0000, 0xc03f_ffff);
        assert_eq!(g.port.memory_window(), Some((0xc020_0000, 0xc03f_ffff)));
        assert_eq!(g.read32(MEMORY_BASE), 0xc030_c020);
        g.port.set_memory_window(0xc000_0000, 0xc00f_0000);
        assert_eq!(g.port.memory_window(), Some((0xc000_0000, 0xc00f_ffff)));
        g.write32(MEMORY_BASE, 0xfe10_fe00);
        g.write32(PREFETCHABLE_MEMORY_BASE, 0x0011_0001);
        g.write32(PREFETCHABLE_BASE_UPPER32, 0x8);
        g.write32(PREFETCHABLE_LIMIT_UPPER32, 0x8);
        assert_eq!(
            g.port.prefetchable_window(),
            Some((0x8_0000_0000, 0x8_001f_ffff))
        );
        g.write16(BRIDGE_CONTROL, 0xffff);
        assert_ne!(g.read16(BRIDGE_CONTROL), 0);
        g.write16(COMMAND, 0x0007);
        assert_eq!(g.read16(COMMAND), 0x0007);
    }

    #[test]
    fn power_management() {
        let mut g = Guest::new(RootPortOptions::default());
        let pm = g.port.pm_capability_offset();
        assert_eq!(g.read16(pm + PM_PMC), 0x0003);
        assert_eq!(g.read16(pm + PM_PMCSR), 0x0008);
        g.write16(pm + PM_PMCSR, 0x0003);
        assert_eq!(g.read16(pm + PM_PMCSR), 0x000b);
        g.write16(pm + PM_PMCSR, 0x0001); // D1 is not supported: ignored
        assert_eq!(g.read16(pm + PM_PMCSR), 0x000b);
        g.write16(pm + PM_PMCSR, 0xfff0);
        assert_eq!(g.read16(pm + PM_PMCSR), 0x0008);
    }

    #[test]
    fn msi_only_when_enabled() {
        let mut g = Guest::new(RootPortOptions::default());
        let _ = g.pciehp_probe();
        assert_eq!(g.msi.count(), 0, "MSI disabled");
        // The CC of the enabling command is pending; enabling MSI now sends it.
        g.enable_msi();
        assert_eq!(g.msi.count(), 1);
        assert_eq!(
            g.msi.sent.lock().unwrap()[0],
            MsiMessage {
                address: 0xfee0_0000,
                data: 0x4041
            }
        );
        assert_eq!(g.isr(), SLTSTA_CC);
        // Disable MSI: an insertion interrupts nobody.
        let msi = g.port.msi_capability_offset();
        g.write16(msi + MSI_MESSAGE_CONTROL, 0);
        g.port.insert_card().unwrap();
        assert_eq!(g.msi.count(), 1);
        assert!(g.port.slot().interrupt_asserted());
    }

    /// The whole life of a slot as Linux's pciehp drives it, register by register.
    #[test]
    fn pciehp_replay() {
        let mut g = Guest::new(RootPortOptions::default());
        g.enable_msi();

        // ---- Probe (pcie_init, pcie_enable_notification) ----
        let cmd = g.pciehp_probe();
        assert_eq!(cmd, SLTCTL_DLLSCE | SLTCTL_ABPE | SLTCTL_HPIE | SLTCTL_CCIE);
        assert_eq!(g.msi.count(), 1, "Command Completed of the enabling write");
        assert_eq!(g.isr(), SLTSTA_CC);
        assert!(g.port.slot().is_armed());
        assert_eq!(
            g.take_events(),
            vec![SlotEvent::Notifications(SlotNotifications {
                hot_plug_interrupt: true,
                attention_button: true,
                command_completed: true,
                link_state: true,
                ..Default::default()
            })]
        );
        // The empty slot's power is already off: pciehp does not touch it.
        assert_ne!(g.cap_read16(PCI_EXP_SLTCTL) & SLTCTL_PCC, 0);

        // ---- Hot-add ----
        g.port.insert_card().unwrap();
        assert_eq!(g.msi.count(), 2, "one MSI for the insertion");
        assert_eq!(
            g.cap_read16(PCI_EXP_SLTSTA),
            SLTSTA_PDS | SLTSTA_PDC | SLTSTA_DLLSC
        );
        assert_eq!(g.isr(), SLTSTA_PDC | SLTSTA_DLLSC);
        assert_eq!(g.cap_read16(PCI_EXP_SLTSTA), SLTSTA_PDS);
        assert_eq!(g.msi.count(), 2);
        // board_added: power on (PCC = 0 is on), then indicators.
        g.write_cmd(0, SLTCTL_PCC);
        assert_eq!(g.take_events(), vec![SlotEvent::PowerOn]);
        assert_eq!(g.msi.count(), 3, "Command Completed");
        assert_eq!(g.isr(), SLTSTA_CC);
        g.write_cmd(
            (Indicator::Blinking.bits() << SLTCTL_PIC_SHIFT)
                | (Indicator::Off.bits() << SLTCTL_AIC_SHIFT),
            SLTCTL_PIC | SLTCTL_AIC,
        );
        assert_eq!(
            g.take_events(),
            vec![SlotEvent::PowerIndicator(Indicator::Blinking)]
        );
        assert_eq!(g.isr(), SLTSTA_CC);
        // pciehp_check_link_status: DLLLA, not training, negotiated width non-zero.
        let lnksta = g.cap_read16(PCI_EXP_LNKSTA);
        assert_ne!(lnksta & LNKSTA_DLLLA, 0);
        assert_eq!(lnksta & (1 << 11), 0);
        assert_ne!(lnksta & 0x03f0, 0);
        set_pic(&mut g, Indicator::On);
        assert_eq!(
            g.take_events(),
            vec![SlotEvent::PowerIndicator(Indicator::On)]
        );
        assert_eq!(g.isr(), SLTSTA_CC);
        assert_eq!(g.msi.count(), 5);

        // ---- Attention button: graceful removal ----
        g.port.press_attention_button();
        assert_eq!(g.msi.count(), 6);
        assert_eq!(g.isr(), SLTSTA_ABP);
        // pciehp_handle_button_press: blink, attention off; then 5 s later, remove_board.
        g.write_cmd(
            (Indicator::Blinking.bits() << SLTCTL_PIC_SHIFT)
                | (Indicator::Off.bits() << SLTCTL_AIC_SHIFT),
            SLTCTL_PIC | SLTCTL_AIC,
        );
        assert_eq!(g.isr(), SLTSTA_CC);
        assert_eq!(
            g.take_events(),
            vec![SlotEvent::PowerIndicator(Indicator::Blinking)]
        );
        g.write_cmd(SLTCTL_PCC, SLTCTL_PCC);
        assert_eq!(
            g.take_events(),
            vec![SlotEvent::PowerOff, SlotEvent::LinkActive(false)]
        );
        assert_eq!(g.cap_read16(PCI_EXP_LNKSTA) & LNKSTA_DLLLA, 0);
        // The link went down with the power: DLLSC with CC, one MSI.
        assert_eq!(g.msi.count(), 8);
        assert_eq!(g.isr(), SLTSTA_CC | SLTSTA_DLLSC);
        set_pic(&mut g, Indicator::Off);
        assert_eq!(
            g.take_events(),
            vec![SlotEvent::PowerIndicator(Indicator::Off)]
        );
        assert_eq!(g.isr(), SLTSTA_CC);
        assert_eq!(g.msi.count(), 9);
        // Only now does the VMM take the card out. PDC is not enabled (ABPE instead): no MSI.
        g.port.remove_card().unwrap();
        assert_eq!(g.msi.count(), 9);
        assert_eq!(g.cap_read16(PCI_EXP_SLTSTA), SLTSTA_PDC);

        // ---- Second hot-add into the same slot ----
        g.port.insert_card().unwrap();
        assert_eq!(g.msi.count(), 10);
        assert_eq!(g.isr(), SLTSTA_PDC | SLTSTA_DLLSC);
        g.write_cmd(0, SLTCTL_PCC);
        assert_eq!(g.take_events(), vec![SlotEvent::PowerOn]);
        assert_eq!(g.isr(), SLTSTA_CC);
        assert_ne!(g.cap_read16(PCI_EXP_LNKSTA) & LNKSTA_DLLLA, 0);

        // ---- Surprise removal ----
        g.port.surprise_remove().unwrap();
        assert_eq!(g.msi.count(), 12);
        assert_eq!(g.isr(), SLTSTA_PDC | SLTSTA_DLLSC);
        assert_eq!(g.cap_read16(PCI_EXP_LNKSTA) & LNKSTA_DLLLA, 0);
        // pciehp powers the empty slot off: a PowerOff for a device already gone, no link event.
        g.write_cmd(SLTCTL_PCC, SLTCTL_PCC);
        assert_eq!(g.take_events(), vec![SlotEvent::PowerOff]);
        assert_eq!(g.isr(), SLTSTA_CC);
    }

    #[test]
    fn partial_and_wide_slot_accesses() {
        let mut g = Guest::new(RootPortOptions::default());
        g.enable_msi();
        let _ = g.pciehp_probe();
        let _ = g.isr();
        let _ = g.take_events();
        g.port.insert_card().unwrap();
        // Byte write to the high byte of Slot Status clears DLLSC only.
        let sta = g.exp(PCI_EXP_SLTSTA);
        assert!(g.port.config_write(sta + 1, &[0x01]).is_empty());
        assert_eq!(g.cap_read16(PCI_EXP_SLTSTA), SLTSTA_PDS | SLTSTA_PDC);
        // A byte write to the low byte of Slot Control keeps the high byte (power stays off).
        let ctl = g.exp(PCI_EXP_SLTCTL);
        let before = g.cap_read16(PCI_EXP_SLTCTL);
        assert!(g.port.config_write(ctl, &[0x00]).is_empty());
        assert_eq!(g.cap_read16(PCI_EXP_SLTCTL), before & 0xff00);
        assert_eq!(
            g.take_events(),
            vec![
                SlotEvent::AttentionIndicator(Indicator::Reserved),
                // DLLSCE is in the high byte: it stays.
                SlotEvent::Notifications(SlotNotifications {
                    link_state: true,
                    ..Default::default()
                })
            ]
        );
        // A dword write at Slot Control clears status and issues a command: CC stays set.
        let value = u32::from(before) | (u32::from(SLTSTA_EVENTS) << 16);
        g.write32(ctl, value);
        assert_eq!(g.cap_read16(PCI_EXP_SLTCTL), before);
        assert_eq!(g.cap_read16(PCI_EXP_SLTSTA), SLTSTA_PDS | SLTSTA_CC);
        // Reading Slot Control and Status as one dword.
        assert_eq!(
            g.read32(ctl),
            u32::from(before) | (u32::from(SLTSTA_PDS | SLTSTA_CC) << 16)
        );
        // Reserved bits of Slot Status and Slot Control stay 0.
        g.cap_write16(PCI_EXP_SLTSTA, 0xfe00);
        assert_eq!(g.cap_read16(PCI_EXP_SLTSTA), SLTSTA_PDS | SLTSTA_CC);
        g.cap_write16(PCI_EXP_SLTCTL, 0xffff);
        assert_eq!(g.cap_read16(PCI_EXP_SLTCTL) & 0xe804, 0);
    }

    #[test]
    fn every_access_size_at_every_offset() {
        for options in [
            RootPortOptions::default(),
            RootPortOptions {
                native_hotplug: false,
                no_command_completed: true,
                port_number: 0xff,
            },
        ] {
            let mut g = Guest::new(options);
            g.enable_msi();
            g.port.insert_card().unwrap();
            for len in 0..=8usize {
                for offset in 0..(CONFIG_SPACE_SIZE as u16 + 16) {
                    let mut buf = [0u8; 8];
                    g.port.config_read(offset, &mut buf[..len]);
                    if usize::from(offset) + len > CONFIG_SPACE_SIZE {
                        assert!(buf[..len].iter().all(|&b| b == 0xff));
                    }
                    let _ = g.port.config_write(offset, &[0xff; 8][..len]);
                    let _ = g.port.config_write(offset, &[0x00; 8][..len]);
                }
            }
            let mut buf = [0u8; 4];
            g.port.config_read(u16::MAX, &mut buf);
            assert_eq!(buf, [0xff; 4]);
            assert!(g.port.config_write(u16::MAX, &[0xff; 4]).is_empty());
            // Still a root port with its identity.
            assert_eq!(g.read32(0), 0x000c_1b36);
            let _ = g.take_events();
        }
    }

    /// A port saved in the middle of a removal (button pressed, the guest blinking, an event
    /// not yet acknowledged) and restored into a port built the same way: the guest reads the
    /// same registers, and the removal goes on from there.
    #[test]
    fn saved_mid_removal_and_restored() {
        let mut g = Guest::new(RootPortOptions::default());
        g.enable_msi();
        g.pciehp_probe();
        g.isr();
        g.port.insert_card().unwrap();
        g.isr();
        g.write_cmd(0, SLTCTL_PCC);
        g.isr();
        set_pic(&mut g, Indicator::On);
        g.isr();
        g.port.press_attention_button();
        set_pic(&mut g, Indicator::Blinking);
        g.take_events();
        let sent = g.msi.count();
        let state = g.port.state();

        let mut d = Guest::new(RootPortOptions::default());
        d.port.restore(&state).unwrap();
        assert_eq!(d.port.state(), state);
        for offset in (0..CONFIG_SPACE_SIZE as u16).step_by(4) {
            assert_eq!(d.read32(offset), g.read32(offset), "offset {offset:#x}");
        }
        assert!(d.port.slot().is_present() && d.port.slot().is_powered());
        assert_eq!(d.port.slot().power_indicator(), Indicator::Blinking);
        assert_eq!(d.msi.count(), 0, "restoring signals nothing");
        // The guest acknowledges the press and powers the slot off: the restored port answers.
        assert_ne!(d.isr() & SLTSTA_ABP, 0);
        d.write_cmd(SLTCTL_PCC, SLTCTL_PCC);
        assert!(d.take_events().contains(&SlotEvent::PowerOff));
        assert_eq!(g.msi.count(), sent);

        // A host bridge's configuration space does not go into a root port.
        let bridge = crate::pci::PciHostBridge::new().state();
        let before = d.port.state();
        let err = d
            .port
            .restore(&PcieRootPortState {
                config: bridge,
                slot: before.slot,
            })
            .unwrap_err();
        assert!(err.reason.contains("vendor/device ID"), "{err}");
        assert_eq!(d.port.state(), before, "a refused restore changes nothing");
    }
}
