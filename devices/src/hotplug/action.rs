//! What the control plane tells the VMM to do, in order. Only the first action of a command's
//! answer may fail (opening a backend, plugging a device, latching an eject request); if it
//! does, the VMM restores the control plane it saved before the command and replies with the
//! error, so that a failed command changes nothing.

use std::path::PathBuf;

use super::function::FunctionKey;
use super::policy::SurprisePolicy;
use super::topology::{BusId, SlotId};
use crate::pci::SlotEvent;
use crate::virtio::block::ImageFormat;

/// Why the attention button is pressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Press {
    /// The first `device_del`.
    Request,
    /// A later `device_del`, after the repeat window.
    Repeat,
    /// The guest was enabling the slot when asked and ignored the press (Linux's pciehp:
    /// "Button press: invalid state"); pressed again once it finished.
    Recheck,
}

/// Why a function is released.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReleaseCause {
    /// The guest powered a native slot off.
    PoweredOff {
        /// In answer to `device_del` (otherwise the guest removed it on its own).
        requested: bool,
    },
    /// The guest's `_EJ0` ejected an ACPI slot.
    Ejected {
        /// In answer to `device_del` (otherwise the guest removed it on its own).
        requested: bool,
    },
}

/// Who ended a pulled-out function's failing of requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PulledRelease {
    /// Its driver reset the device.
    DriverReset,
    /// The VMM: a hot-add into the same slot.
    Vmm,
}

/// An effect for the VMM to carry out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Open the image of node `node` (may fail).
    OpenBackend {
        /// Node name.
        node: String,
        /// The image.
        path: PathBuf,
        /// Read-only.
        readonly: bool,
        /// Its format.
        format: ImageFormat,
    },
    /// Close node `node`: no device uses it.
    CloseBackend {
        /// Node name.
        node: String,
    },
    /// Create device `id` on node `node`'s backend and insert it into `slot` as a hot-add
    /// (may fail).
    Plug {
        /// The new function.
        key: FunctionKey,
        /// Its id.
        id: String,
        /// Where.
        slot: SlotId,
        /// Its backend.
        node: String,
    },
    /// Press root port `port`'s attention button for device `id`.
    PressButton {
        /// The port.
        port: u8,
        /// The device the press is about.
        id: String,
        /// Why.
        press: Press,
    },
    /// Latch an eject request for device `device` of ACPI hot-plug bus `select` (may fail).
    RequestEject {
        /// The bus select value.
        select: u8,
        /// The device number.
        device: u8,
        /// The bus, by name.
        bus: BusId,
        /// The device the request is about.
        id: String,
    },
    /// The guest let go of function `key`: take it off its bus, stop it, release its backend,
    /// empty its slot.
    Release {
        /// The function.
        key: FunctionKey,
        /// Its id.
        id: String,
        /// Its slot.
        slot: SlotId,
        /// Why.
        cause: ReleaseCause,
    },
    /// Pull function `key` out without asking the guest, as `policy` says; the VMM then sends
    /// [`HostEvent::PulledGone`](super::HostEvent::PulledGone) if the device fails nothing.
    Pull {
        /// The function.
        key: FunctionKey,
        /// Its id.
        id: String,
        /// Its slot.
        slot: SlotId,
        /// What happens to its requests and BARs.
        policy: SurprisePolicy,
    },
    /// Let go of pulled-out function `key`: it stops failing requests, and what the VMM kept
    /// of it goes.
    ReleasePulled {
        /// The function.
        key: FunctionKey,
        /// Its id (which another device may have by now).
        id: String,
        /// The slot it was pulled from.
        slot: SlotId,
        /// Who ended it.
        by: PulledRelease,
    },
    /// Send an event to the control socket's clients.
    Emit(Event),
    /// Something the VMM should log as a warning.
    Warn(String),
}

/// A control-socket event, with its data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// `DEVICE_DELETED`: the device is gone.
    DeviceDeleted {
        /// The device.
        id: String,
    },
    /// `X_HOTPLUG_SLOT`: the guest changed a slot.
    Slot {
        /// The slot's bus.
        bus: BusId,
        /// Its physical slot number.
        slot: u32,
        /// What changed.
        change: SlotChange,
        /// The device in the slot, if any.
        device: Option<String>,
    },
    /// `X_UNPLUG_STALLED`: a removal request has had no answer for the stall timeout.
    UnplugStalled {
        /// The device.
        id: String,
        /// Its bus.
        bus: BusId,
        /// Seconds since the first request.
        seconds: u64,
        /// Why, from the slot's registers.
        diagnosis: String,
    },
    /// `X_BACKEND_ERROR`: a device's backend failed (reported once per device).
    BackendError {
        /// The device.
        id: String,
        /// What failed.
        operation: String,
        /// The host's error.
        error: String,
        /// Whether the device is pulled out for it.
        remove: bool,
    },
}

/// What an `X_HOTPLUG_SLOT` reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SlotChange {
    /// A Slot Control command of the guest's.
    Guest(SlotEvent),
    /// The guest ejected the slot (`_EJ0`).
    Ejected,
}
