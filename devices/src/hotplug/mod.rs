//! The hot-plug control plane (SPEC.md §5, §6) as a pure state machine: which backends are
//! open, which function sits in which slot and where each is in its life, and what to do about
//! a command, a guest's answer or the passing of time. No KVM, threads, sockets, JSON or clock:
//! a VMM feeds it inputs stamped with `now` and carries out the [`Action`]s it returns, so every
//! rule below is tested here without a guest (unit tests, and a model-based randomized test
//! that drives real [`HotplugSlot`](crate::pci::HotplugSlot)s and a real
//! [`AcpiHotplugController`](crate::acpi_hotplug::AcpiHotplugController) with a simulated
//! pciehp and acpiphp).
//!
//! # Inputs and outputs
//!
//! - [`Command`]s from the control socket, arguments already typed: `blockdev-add`,
//!   `blockdev-del`, `device_add`, `device_del`, `x-surprise-remove`. Each either is refused
//!   with a [`HotplugError`] and changes nothing, or returns actions.
//! - [`GuestEvent`]s: a Slot Control command a root port saw, an ACPI eject, a pulled device's
//!   driver reset. [`HostEvent`]s: a failing backend, a pulled device the VMM let go by itself.
//! - [`HotplugControl::tick`]: time passing.
//! - Out: [`Action`]s — open or close a backend, plug a device, press a button, latch an eject
//!   request, release or pull a device, emit an [`Event`].
//!
//! What the guest wrote into the slots' registers (indicators, enables, acknowledgements, the
//! ACPI latches) is read through [`SlotRegisters`] when a rule needs it, never copied.
//!
//! # The rules
//!
//! - **A backend outlives its device.** `blockdev-del` of a node an attached device uses is
//!   refused; a device's own backend is released with the device ([`Action::Release`],
//!   [`Action::Pull`]), never before. This is the incident the project exists for: a backend
//!   deleted while the guest was still ejecting its frontend left the VMM's records disagreeing.
//! - **The guest answers a graceful removal.** `device_del` presses a native slot's attention
//!   button, or latches an ACPI eject request; the device is released only when the guest
//!   powered the slot off and turned its power indicator off (or [`RELEASE_AFTER`] after the
//!   power-off), or evaluated the slot's `_EJ0`. `DEVICE_DELETED` follows the release, once.
//! - **Busy refusal.** While the guest blinks a native slot's power indicator — pciehp's 5 s
//!   grace period after a press, or while it brings the slot up — `device_del` is refused: a
//!   second press inside the grace period cancels the first.
//! - **The repeat window.** A `device_del` within [`REPRESS_AFTER`] of the last request is
//!   refused; after it, the button is pressed (or the eject requested) again.
//! - **A press while enabling.** pciehp ignores a press while it enables the slot ("invalid
//!   state"); when the guest turns the power indicator on with a removal pending, the control
//!   plane looks again [`RECHECK_AFTER`] later and presses again if the guest is not blinking.
//! - **Stall diagnosis.** A removal unanswered for [`Options::stall_after`] is reported once with
//!   `X_UNPLUG_STALLED`, with the cause read from the registers ([`diagnosis`]); the device
//!   stays, consistent, until the guest answers or it is pulled.
//! - **Surprise removal.** `x-surprise-remove` pulls a device out as its [`SurprisePolicy`]
//!   says; `DEVICE_DELETED` follows at once and the id is free again. The function stays
//!   *pulled* until its driver resets it, the slot is reused, or the VMM lets it go; the native
//!   slot's next power-off is the guest's answer to the pull, not to a card inserted since.
//! - **Slot reuse.** A slot takes a new device once its occupant is released or pulled; an ACPI
//!   slot only after the guest read the pull's bus check.
//! - **Failing backends** are reported once per device (`X_BACKEND_ERROR`), and pull the
//!   device out where the user asked for that.

mod action;
mod command;
mod control;
pub mod diagnosis;
mod error;
mod function;
mod policy;
mod registers;
pub mod topology;

#[cfg(test)]
mod model_tests;
#[cfg(test)]
mod tests;

pub use action::{Action, Event, Press, PulledRelease, ReleaseCause, SlotChange};
pub use command::{Command, DeviceAdd, GuestEvent, HostEvent};
pub use control::{
    HotplugControl, Node, Options, RECHECK_AFTER, RELEASE_AFTER, REPRESS_AFTER, STALL_AFTER,
};
pub use error::HotplugError;
pub use function::{Backing, Function, FunctionKey, Lifecycle, UnplugRequest};
pub use policy::{BarReads, InFlightPolicy, PortMode, SurprisePolicy};
pub use registers::{PortSlotView, SlotRegisters};
pub use topology::{AcpiBus, BusId, DeviceAddr, SlotId, Topology};
