//! The PCI Express memory-mapped configuration space table (`MCFG`): one
//! allocation covering the host bridge's segment and bus range.

use acpi_tables::mcfg::MCFG;
use acpi_tables::Aml;

use crate::{MachineConfig, OEM_ID, OEM_REVISION, OEM_TABLE_ID};

/// Builds the MCFG for `cfg`.
pub fn build_mcfg(cfg: &MachineConfig) -> Vec<u8> {
    let pci = &cfg.pci;
    let mut mcfg = MCFG::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    mcfg.add_ecam(pci.ecam_base, pci.segment, pci.bus_start, pci.bus_end);
    let mut bytes = Vec::new();
    mcfg.to_aml_bytes(&mut bytes);
    bytes
}
