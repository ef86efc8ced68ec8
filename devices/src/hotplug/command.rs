//! What the control plane is told: commands from the control socket (arguments already typed),
//! what the guest did, and what the host saw.

use std::path::PathBuf;

use super::function::FunctionKey;
use super::policy::{BarReads, InFlightPolicy};
use super::topology::{BusId, DeviceAddr};
use crate::pci::SlotEvent;
use crate::virtio::block::ImageFormat;

/// A hot-plug command of the control socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// `blockdev-add`: a backend the VMM opens as `node`.
    BlockdevAdd {
        /// Node name.
        node: String,
        /// The image.
        path: PathBuf,
        /// Opened read-only.
        readonly: bool,
        /// Its format (the node's driver: `raw`, `file` or `qcow2`).
        format: ImageFormat,
    },
    /// `blockdev-del`: close backend `node`, refused while a device uses it.
    BlockdevDel {
        /// Node name.
        node: String,
    },
    /// `device_add` of a virtio-blk disk.
    DeviceAdd(DeviceAdd),
    /// `device_del`: ask the guest to let go of the device.
    DeviceDel {
        /// The device.
        id: String,
    },
    /// `x-surprise-remove`: take the device away without asking the guest.
    SurpriseRemove {
        /// The device.
        id: String,
        /// What happens to its requests in flight (default: the control plane's).
        in_flight: Option<InFlightPolicy>,
        /// What its BARs read afterwards (default: the control plane's).
        bar_reads: Option<BarReads>,
    },
}

/// `device_add`'s arguments.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceAdd {
    /// The new device's id.
    pub id: String,
    /// The `blockdev-add` node it uses.
    pub drive: String,
    /// The bus; `None`: the first root port with an empty slot.
    pub bus: Option<BusId>,
    /// The slot on the bus; `None`: the first free one.
    pub addr: Option<DeviceAddr>,
    /// `x-backend-error`: a failing backend pulls the disk out (default: the control plane's).
    pub remove_on_backend_error: Option<bool>,
}

/// What the guest did, as the devices report it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestEvent {
    /// A Slot Control write on root port `port` did `event`.
    SlotControl {
        /// The port.
        port: u8,
        /// What the command changed.
        event: SlotEvent,
    },
    /// The guest's `_EJ0` ejected device `device` of ACPI hot-plug bus `select`.
    Eject {
        /// The bus select value.
        select: u8,
        /// The device number.
        device: u8,
    },
    /// The driver of pulled-out function `key` reset its device (wrote 0 to `device_status`):
    /// it has let go of it, and the device stops failing its requests.
    DriverReset {
        /// The function.
        key: FunctionKey,
    },
}

/// What the host saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostEvent {
    /// Device `id`'s backend failed `operation` with `error`.
    BackendFailed {
        /// The device.
        id: String,
        /// What failed ("read", "write", "flush", ...).
        operation: String,
        /// The host's error.
        error: String,
    },
    /// The VMM let go of pulled-out function `key` by itself: its device failed nothing after
    /// the pull (policy `drop`, or no request was ever made), or the guest mapped a BAR over
    /// its vacated one.
    PulledGone {
        /// The function.
        key: FunctionKey,
    },
}
