//! What a snapshot or a migration carries besides guest memory: the vCPUs, the in-kernel
//! interrupt controllers and clock, every device, and the hot-plug control plane
//! (docs/snapshot-format.md lists each field and what happens to requests in flight).

use kvm_bindings::{kvm_clock_data, kvm_irqchip};
use serde::{Deserialize, Serialize};

use devices::pci::PciConfigurationState;
use devices::serial::SerialDeviceState;

use crate::hotplug::HotplugState;
use crate::pci_devices::PciDevicesState;
use crate::vcpu_state::VcpuState;

/// The in-kernel interrupt controllers: the two 8259 PICs and the IOAPIC.
#[derive(Debug, Serialize, Deserialize)]
pub struct IrqchipState {
    /// The master PIC, the slave PIC, the IOAPIC (KVM_GET_IRQCHIP of chips 0, 1, 2).
    pub chips: Vec<kvm_irqchip>,
}

/// The legacy and platform devices.
#[derive(Debug, Serialize, Deserialize)]
pub struct PlatformState {
    /// The 16550 console.
    pub serial: SerialDeviceState,
    /// The ACPI sleep status register.
    pub sleep_status: u8,
    /// CONFIG_ADDRESS of the 0xCF8 mechanism.
    pub config_address: u32,
    /// The host bridge's configuration space.
    pub host_bridge: PciConfigurationState,
}

/// Everything of a paused machine but its memory.
#[derive(Debug, Serialize, Deserialize)]
pub struct MachineState {
    /// Whether the VM ran when the migration started (its destination takes that on).
    pub running: bool,
    /// Every vCPU, in order.
    pub vcpus: Vec<VcpuState>,
    /// The interrupt controllers.
    pub irqchip: IrqchipState,
    /// The KVM clock.
    pub clock: kvm_clock_data,
    /// Legacy and platform devices.
    pub platform: PlatformState,
    /// Root ports, the ACPI hot-plug controller, the `_OSC` report, the disks.
    pub pci: PciDevicesState,
    /// The hot-plug control plane and the nodes.
    pub hotplug: HotplugState,
}
