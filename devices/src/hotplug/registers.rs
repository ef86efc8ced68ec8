//! What the control plane reads of the guest's side of a slot: the registers the guest writes
//! (indicators, notification enables, acknowledged events, MSI enable) and the ACPI hot-plug
//! controller's per-bus latches. The control plane never keeps a copy of these — it asks
//! through [`SlotRegisters`] whenever a rule depends on them, so its decisions and the
//! registers cannot drift apart.

use crate::acpi_hotplug::AcpiBusState;
use crate::pci::slot::{HotplugSlot, SLTSTA_ABP};
use crate::pci::{Indicator, SlotNotifications};

/// One root port slot's registers, as far as hot-plug decisions go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortSlotView {
    /// Presence Detect State.
    pub present: bool,
    /// Power Controller Control says on.
    pub powered: bool,
    /// The power indicator.
    pub power_indicator: Indicator,
    /// The notifications the guest enabled in Slot Control.
    pub notifications: SlotNotifications,
    /// Attention Button Pressed is set: the guest has not acknowledged a press.
    pub attention_pressed: bool,
    /// The guest enabled the port's MSI.
    pub msi_enabled: bool,
}

impl PortSlotView {
    /// The view of `slot`, on a port whose MSI the guest has (`msi_enabled`) or has not
    /// enabled.
    pub fn of(slot: &HotplugSlot, msi_enabled: bool) -> Self {
        PortSlotView {
            present: slot.is_present(),
            powered: slot.is_powered(),
            power_indicator: slot.power_indicator(),
            notifications: slot.notifications(),
            attention_pressed: slot.status_events() & SLTSTA_ABP != 0,
            msi_enabled,
        }
    }
}

/// Read access to the slots' registers. Implementations answer from the live devices (a VMM)
/// or from models (tests); `None` for a port or bus the machine does not have.
pub trait SlotRegisters {
    /// Root port `port`'s slot.
    fn port_slot(&self, port: u8) -> Option<PortSlotView>;
    /// ACPI hot-plug bus `select`'s latches.
    fn acpi_bus(&self, select: u8) -> Option<AcpiBusState>;
}
