//! Why the guest has not answered a removal request, in words a user can act on, from what the
//! slot's registers say the guest did (`X_UNPLUG_STALLED`'s `diagnosis`).
//!
//! Linux's pciehp enables Hot-Plug Interrupt Enable, Data Link Layer State Changed and
//! Attention Button Pressed notifications when it binds (`pcie_enable_notification`); it
//! acknowledges a press from its interrupt handler, blinks the power indicator for its 5 s
//! grace period, then powers the slot off. Each step it did not take names the cause. acpiphp
//! has no registers of its own: the ACPI hot-plug controller only shows whether the guest's
//! event method read the bus's requests since the request was made.

use super::registers::PortSlotView;
use super::topology::BusId;
use crate::pci::Indicator;

/// Why the guest has not answered an attention button press on root port `port`, whose slot
/// looks like `slot`.
pub fn native(port: BusId, slot: &PortSlotView) -> String {
    let n = slot.notifications;
    if !n.hot_plug_interrupt {
        return format!(
            "guest pciehp never enabled hot-plug interrupts on {port}: driver not bound — check _OSC negotiation or kernel parameters such as pcie_aspm=off"
        );
    }
    if !n.attention_button {
        return format!(
            "guest enabled hot-plug interrupts on {port} but not the attention button: its driver does not handle button presses"
        );
    }
    if !slot.msi_enabled {
        return format!(
            "guest armed {port} but never enabled its MSI: the button press interrupt cannot be delivered"
        );
    }
    if slot.attention_pressed {
        return format!(
            "guest has not acknowledged the attention button on {port} (Attention Button Pressed still set): its interrupt handler did not run"
        );
    }
    match slot.power_indicator {
        Indicator::Blinking => format!(
            "guest acknowledged the button on {port} and blinks the power indicator, but has not powered the slot off: its driver is still letting go of the device"
        ),
        _ => format!(
            "guest acknowledged the button on {port} but kept the slot powered: the press was cancelled (a second press within 5 s) or the guest refused the removal"
        ),
    }
}

/// Why the guest has not ejected an ACPI slot of `bus` it was asked to: `looked` says whether
/// its event method read the eject request.
pub fn acpi(bus: BusId, looked: bool) -> String {
    if looked {
        format!("guest read the ACPI eject request for {bus} but never evaluated the slot's _EJ0: acpiphp did not take the request (slot not registered, or the driver refused to let go of the device)")
    } else {
        format!("guest never read the ACPI eject request for {bus}: its Generic Event Device handler did not run (ACPI0013 not bound, or its interrupt not delivered)")
    }
}
