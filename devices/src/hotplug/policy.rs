//! The choices a user makes about hot-plug: how a root port's slot is driven, and what a
//! surprise removal does to the device it pulls out.

pub use crate::virtio::InFlightPolicy;

/// How the guest drives a root port's slot.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    serde::Serialize,
    serde::Deserialize,
)]
pub enum PortMode {
    /// PCI Express native hot-plug: the guest's pciehp drives the slot registers.
    #[default]
    Native,
    /// ACPI hot-plug: the guest's acpiphp, through the DSDT and the ACPI hot-plug controller.
    Acpi,
}

impl PortMode {
    /// The mode's name on the command line and in x-query-hotplug.
    pub fn name(self) -> &'static str {
        match self {
            PortMode::Native => "native",
            PortMode::Acpi => "acpi",
        }
    }
}

impl std::str::FromStr for PortMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "native" => Ok(PortMode::Native),
            "acpi" => Ok(PortMode::Acpi),
            _ => Err(format!("'{s}' is not a hot-plug mode (native or acpi)")),
        }
    }
}

/// What the BARs of a device pulled out by surprise read from then on.
///
/// The default is [`BarReads::Zero`], the reads that the supported guests survive (and what
/// QEMU's unclaimed MMIO reads); [`BarReads::AllOnes`] is what hardware does, kept to reproduce
/// the hang it causes in Linux.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum BarReads {
    /// All-ones, writes dropped: the device is gone, as on hardware (the cycle is not claimed).
    /// Linux's virtio-pci (6.1, 6.12) polls a departing device's status until it reads zero, so
    /// it spins forever in `vp_reset`: the function never leaves the guest's bus and the slot's
    /// hot-plug is wedged for good.
    AllOnes,
    /// Zero, writes dropped, until the guest maps another BAR over them: Linux's virtio-pci
    /// reads the status as reset, its removal completes and the slot takes a new device.
    #[default]
    Zero,
}

impl BarReads {
    /// The name on the command line and the control socket.
    pub fn name(self) -> &'static str {
        match self {
            BarReads::AllOnes => "all-ones",
            BarReads::Zero => "zero",
        }
    }
}

impl std::str::FromStr for BarReads {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "all-ones" => Ok(BarReads::AllOnes),
            "zero" => Ok(BarReads::Zero),
            _ => Err(format!("'{s}' is not all-ones or zero")),
        }
    }
}

/// What a surprise removal does to the device it pulls out: its requests in flight, and what
/// its BARs read afterwards.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SurprisePolicy {
    /// The requests the guest made available and the device has not completed.
    pub in_flight: InFlightPolicy,
    /// The pulled device's BARs.
    pub bar_reads: BarReads,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_back() {
        for m in [PortMode::Native, PortMode::Acpi] {
            assert_eq!(m.name().parse::<PortMode>().unwrap(), m);
        }
        for b in [BarReads::AllOnes, BarReads::Zero] {
            assert_eq!(b.name().parse::<BarReads>().unwrap(), b);
        }
        assert!("ones".parse::<BarReads>().is_err());
        assert!("pciehp".parse::<PortMode>().is_err());
    }
}
