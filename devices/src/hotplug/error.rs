//! Why a hot-plug command was refused. A refused command changes nothing; each variant's
//! message is the control socket's error text.

use super::topology::{BusId, FIRST_ROOT_BUS_SLOT, FIRST_ROOT_PORT_SLOT};

/// A refused hot-plug command.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HotplugError {
    /// A node name must start with a letter and hold letters, digits, '-', '_', '.' only.
    #[error("Invalid node-name: '{0}' (a letter, then letters, digits, '-', '_', '.')")]
    InvalidNodeName(String),
    /// `blockdev-add` of a node name already in use.
    #[error("Duplicate nodes with node-name='{0}'")]
    DuplicateNode(String),
    /// `blockdev-del` of a node that does not exist.
    #[error("Failed to find node with node-name='{0}'")]
    NoSuchNode(String),
    /// `blockdev-del` of a node a device still uses.
    #[error("Node '{node}' is busy: device '{user}' uses it (device_del it first, and wait for DEVICE_DELETED)")]
    NodeBusy {
        /// The node.
        node: String,
        /// The device using it.
        user: String,
    },
    /// A device id must be 1..=64 characters, without control characters or '/'.
    #[error("Invalid device id '{0}'")]
    InvalidId(String),
    /// `device_add` with the id of a device that is still there.
    #[error("Duplicate device ID '{0}'")]
    DuplicateId(String),
    /// `device_add` naming a drive no `blockdev-add` opened.
    #[error("Drive '{0}' not found (add it with blockdev-add first)")]
    NoSuchDrive(String),
    /// `device_add` naming a drive another device uses.
    #[error("Drive '{drive}' is already in use by device '{user}'")]
    DriveInUse {
        /// The drive.
        drive: String,
        /// The device using it.
        user: String,
    },
    /// A bus the machine does not have.
    #[error("Bus '{0}' not found")]
    NoSuchBus(BusId),
    /// A hot-add into the root bus of a machine without ACPI hot-plug.
    #[error("Bus 'pcie.0' does not support hotplugging")]
    RootBusNotHotpluggable,
    /// A removal from the root bus of a machine without ACPI hot-plug.
    #[error("Bus 'pcie.0' does not support hotplugging: '{0}' cannot be removed")]
    CannotRemove(String),
    /// No root port has an empty slot.
    #[error("No free root port slot for the device")]
    NoFreePort,
    /// No root bus hot-plug slot is empty.
    #[error("No free slot on bus 'pcie.0' for the device")]
    NoFreeRootBusSlot,
    /// `addr` other than device 0 function 0 on a root port.
    #[error("addr '{addr}': the slot of root port {port} holds device 0 function 0 only")]
    PortAddr {
        /// The argument.
        addr: String,
        /// The port.
        port: BusId,
    },
    /// `addr` on the root bus outside its hot-plug slots.
    #[error("addr '{addr}': device {device:#x} of pcie.0 is not a hot-plug slot (slots are {:#x}..{:#x})", FIRST_ROOT_BUS_SLOT, FIRST_ROOT_PORT_SLOT - 1)]
    NotAHotplugSlot {
        /// The argument.
        addr: String,
        /// Its device number.
        device: u8,
    },
    /// `addr` with a function other than 0.
    #[error("addr '{0}': this VMM hot-plugs function 0 only")]
    FunctionNotZero(String),
    /// The slot holds a device (or a card on its way out).
    #[error("Slot of {slot} is occupied by '{occupant}'")]
    SlotOccupied {
        /// The slot, as messages name it ("rp1", "pcie.0 slot 5").
        slot: String,
        /// Who is there.
        occupant: String,
    },
    /// An ACPI slot whose last device was pulled out, before the guest read the bus check: a
    /// device inserted now would look to acpiphp like the one it still has.
    #[error("Slot {device:#x} of {bus}: the guest has not yet taken notice of the surprise removal of its last device; retry shortly")]
    BusCheckPending {
        /// The slot's bus.
        bus: BusId,
        /// Its device number.
        device: u8,
    },
    /// `device_add` into an empty native slot whose power indicator blinks: the guest is
    /// still powering it on or off after the card that was there, and would take a card
    /// inserted now for an effect of its own power-off.
    #[error("Slot of {0}: the guest is still powering it on or off (power indicator blinking) after the card that left; retry shortly")]
    SlotInTransition(BusId),
    /// `device_add` into an ACPI slot whose last card was pulled out moments ago and whose
    /// driver in the guest has not let go of it yet: acpiphp, still busy with it, would miss a
    /// card inserted now.
    #[error(
        "{0}: the guest's driver has not yet let go of the card pulled out of it; retry shortly"
    )]
    PulledNotReleased(String),
    /// No device has this id.
    #[error("Device '{0}' not found")]
    DeviceNotFound(String),
    /// `device_del` while the guest blinks the slot's power indicator: pressing the button now
    /// would cancel what the guest is doing.
    #[error("Hot-unplug of '{id}' refused: guest is busy (power indicator of {port} blinking)")]
    GuestBusy {
        /// The device.
        id: String,
        /// Its port.
        port: BusId,
    },
    /// A second `device_del` sooner than the repeat window after the last: pressing again
    /// would cancel the first press.
    #[error("device_del of '{id}' already requested {ms} ms ago; waiting for the guest")]
    AlreadyRequested {
        /// The device.
        id: String,
        /// How long ago the last request was made.
        ms: u128,
    },
}

impl HotplugError {
    /// Whether the error is QMP's `DeviceNotFound` class rather than `GenericError`.
    pub fn is_device_not_found(&self) -> bool {
        matches!(self, HotplugError::DeviceNotFound(_))
    }
}
