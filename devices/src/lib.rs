//! Device models for hotplug-vmm, usable by any VMM: PCI/PCIe configuration space, host bridge,
//! the ACPI PCI hot-plug controller, the `_OSC` report registers,
//! legacy platform devices (16550 console, ACPI power registers).
//!
//! Nothing here depends on KVM. Devices raise interrupts through [`interrupt::InterruptLine`] and
//! sit on the port/MMIO buses of the `vm-device` crate.

#![warn(missing_docs)]

pub mod acpi_hotplug;
mod dword_registers;
pub mod guest_log;
pub mod hotplug;
pub mod interrupt;
pub mod osc_report;
pub mod pci;
pub mod power_control;
pub mod register_trace;
pub mod serial;
pub mod state;
pub mod virtio;
