//! The register layouts of hotplug-vmm's platform, defined once for the device models that
//! decode them and the AML that drives them. A VMM that builds its DSDT with one crate and its
//! devices with another cannot then disagree with itself about an offset.
//!
//! - [`acpi_hotplug`]: the ACPI PCI hot-plug controller's register block.
//! - [`osc_report`]: the `_OSC` report registers and the `_OSC` bits they carry.

#![no_std]
#![warn(missing_docs)]

pub mod acpi_hotplug;
pub mod osc_report;
