//! Boots the test guest on both kernels with 1 and 2 vCPUs and checks, in one boot each, what the
//! guest itself reports: the ready marker, its CPUs, the PCI host bridge, the ACPI tables and the
//! ACPI/PCI lines of its dmesg; then `poweroff -f` must end the VMM with status 0.

mod common;

use common::{BootOptions, Guest};

fn boot_suite(version: &str, cpus: u8) {
    if !common::kernel_versions().iter().any(|v| v == version) {
        eprintln!("kernel {version} not selected by HOTPLUG_VMM_KERNELS");
        return;
    }
    let (mut g, ready) = Guest::boot(&BootOptions::new(version).cpus(cpus));

    // The ready marker carries uptime, kernel release and CPU count.
    assert!(ready.contains(&format!("kernel={version}.")), "{ready}");
    assert!(ready.contains(&format!("cpus={cpus}")), "{ready}");
    assert!(ready.contains("uptime="), "{ready}");

    // CPUs: all of them online.
    assert_eq!(g.run("grep -c ^processor /proc/cpuinfo"), cpus.to_string());
    let online = if cpus == 1 {
        "0".to_string()
    } else {
        format!("0-{}", cpus - 1)
    };
    assert_eq!(g.run("cat /sys/devices/system/cpu/online"), online);

    // The host bridge, enumerated through ECAM, with the class code of a host bridge.
    let pci = g.run("ls /sys/bus/pci/devices");
    assert!(pci.lines().any(|l| l == "0000:00:00.0"), "{pci}");
    assert_eq!(
        g.run("cat /sys/bus/pci/devices/0000:00:00.0/class"),
        "0x060000"
    );

    // The ACPI tables the VMM builds, as the guest sees them.
    let tables = g.run("ls /sys/firmware/acpi/tables");
    for t in ["DSDT", "FACP", "APIC", "MCFG"] {
        assert!(tables.lines().any(|l| l == t), "{t} missing from {tables}");
    }

    // No workaround on the command line.
    let cmdline = g.run("cat /proc/cmdline");
    for bad in ["acpi=", "pci=", "pcie_ports="] {
        assert!(!cmdline.contains(bad), "{cmdline}");
    }

    // dmesg: ACPI and PCI came up cleanly, MMCONFIG is used, _OSC granted native hotplug.
    let dmesg = g.run("dmesg");
    for bad in [
        "ACPI Error",
        "ACPI BIOS Error",
        "FW_BUG",
        "Firmware Bug",
        "firmware bug",
    ] {
        let hits: Vec<&str> = dmesg.lines().filter(|l| l.contains(bad)).collect();
        assert!(hits.is_empty(), "dmesg has {bad:?}: {hits:#?}");
    }
    let osc = dmesg
        .lines()
        .find(|l| l.contains("_OSC: OS now controls"))
        .unwrap_or_else(|| panic!("no _OSC line in dmesg:\n{dmesg}"));
    assert!(osc.contains("PCIeHotplug"), "{osc}");
    assert!(
        dmesg.lines().any(|l| l.contains("MMCONFIG")
            && l.contains("reserved")
            && !l.contains("not reserved")),
        "MMCONFIG not used:\n{dmesg}"
    );
    assert!(
        dmesg.contains("PNP0A08"),
        "no PCIe host bridge in dmesg:\n{dmesg}"
    );

    let status = g.poweroff();
    assert_eq!(
        status.code(),
        Some(0),
        "poweroff -f must end the VMM with status 0"
    );
}

#[test]
fn linux_6_1_one_vcpu() {
    boot_suite("6.1", 1);
}

#[test]
fn linux_6_1_two_vcpus() {
    boot_suite("6.1", 2);
}

#[test]
fn linux_6_12_one_vcpu() {
    boot_suite("6.12", 1);
}

#[test]
fn linux_6_12_two_vcpus() {
    boot_suite("6.12", 2);
}
