//! Whether a snapshot or an incoming migration fits the machine the destination was started
//! as. Pure: the source describes its machine (the stream's `CONF` record), the destination
//! describes its own from its command line, and [`check`] names the first difference, with
//! the option that makes it.

use devices::virtio::block::ImageFormat;
use std::path::PathBuf;

use devices::hotplug::PortMode;
use serde::{Deserialize, Serialize};

/// A disk given on the source's command line (`--disk`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ColdDisk {
    /// The image.
    pub path: PathBuf,
    /// `id=`, if given.
    pub id: Option<String>,
    /// `readonly=on`.
    pub readonly: bool,
    /// `bus=`.
    pub bus: String,
    /// `format=`, if given.
    #[serde(default)]
    pub format: Option<ImageFormat>,
}

/// What a machine is made of: what must be the same on both sides of a migration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineConfig {
    /// vCPUs (`--cpus`).
    pub cpus: u8,
    /// Guest RAM in bytes (`--memory`).
    pub memory: u64,
    /// Each root port's hot-plug mode (`--root-ports`, `--root-port-hotplug`).
    pub root_ports: Vec<PortMode>,
    /// `--no-command-completed`.
    pub no_command_completed: bool,
    /// The host bridge's `_OSC` grants native hot-plug (`--osc-native-hotplug`).
    pub osc_native_hotplug: bool,
    /// The disks of the command line (`--disk`); the disks a snapshot restores are the ones
    /// its state lists, which may differ since (hot-plug).
    pub disks: Vec<ColdDisk>,
}

fn ports(modes: &[PortMode]) -> String {
    if modes.is_empty() {
        return "none".into();
    }
    let names: Vec<String> = modes
        .iter()
        .enumerate()
        .map(|(n, m)| format!("rp{n}={}", m.name()))
        .collect();
    names.join(",")
}

/// `Err` naming the first way in which `source`'s machine differs from `here`'s, and the
/// option that decides it. `here.disks` empty accepts any disks (they come from the stream).
pub fn check(source: &MachineConfig, here: &MachineConfig) -> Result<(), String> {
    if source.cpus != here.cpus {
        return Err(format!(
            "the source machine has {} vCPUs, this one {} (--cpus)",
            source.cpus, here.cpus
        ));
    }
    if source.memory != here.memory {
        return Err(format!(
            "the source machine has {} MiB of memory, this one {} MiB (--memory)",
            source.memory >> 20,
            here.memory >> 20
        ));
    }
    if source.root_ports != here.root_ports {
        return Err(format!(
            "the source machine's root ports are {}, this one's {} (--root-ports, --root-port-hotplug)",
            ports(&source.root_ports),
            ports(&here.root_ports)
        ));
    }
    if source.no_command_completed != here.no_command_completed {
        return Err(format!(
            "the source machine's root ports {} No Command Completed Support, this one's {} (--no-command-completed)",
            if source.no_command_completed { "advertise" } else { "do not advertise" },
            if here.no_command_completed { "do" } else { "do not" }
        ));
    }
    if source.osc_native_hotplug != here.osc_native_hotplug {
        let word = |g| if g { "grants" } else { "denies" };
        return Err(format!(
            "the source machine's _OSC {} native hot-plug, this one's {} (--osc-native-hotplug)",
            word(source.osc_native_hotplug),
            word(here.osc_native_hotplug)
        ));
    }
    if !here.disks.is_empty() && source.disks != here.disks {
        return Err(format!(
            "the source machine was started with {} --disk option(s) other than this one's {}; give the same ones, or none",
            source.disks.len(),
            here.disks.len()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine() -> MachineConfig {
        MachineConfig {
            cpus: 1,
            memory: 256 << 20,
            root_ports: vec![PortMode::Native, PortMode::Acpi],
            no_command_completed: false,
            osc_native_hotplug: true,
            disks: vec![ColdDisk {
                path: "/d.img".into(),
                id: None,
                readonly: false,
                bus: "rp0".into(),
                format: None,
            }],
        }
    }

    #[test]
    fn each_difference_is_named_with_its_option() {
        let source = machine();
        assert_eq!(check(&source, &source), Ok(()));
        type Change = Box<dyn Fn(&mut MachineConfig)>;
        let cases: Vec<(Change, &str)> = vec![
            (Box::new(|m| m.cpus = 2), "1 vCPUs, this one 2 (--cpus)"),
            (
                Box::new(|m| m.memory = 512 << 20),
                "256 MiB of memory, this one 512 MiB",
            ),
            (
                Box::new(|m| m.root_ports[1] = PortMode::Native),
                "rp0=native,rp1=acpi, this one's rp0=native,rp1=native",
            ),
            (Box::new(|m| m.root_ports.clear()), "this one's none"),
            (
                Box::new(|m| m.no_command_completed = true),
                "(--no-command-completed)",
            ),
            (
                Box::new(|m| m.osc_native_hotplug = false),
                "_OSC grants native hot-plug, this one's denies",
            ),
            (Box::new(|m| m.disks[0].readonly = true), "--disk"),
            (
                Box::new(|m| m.disks[0].format = Some(ImageFormat::Qcow2)),
                "--disk",
            ),
        ];
        for (change, needle) in cases {
            let mut here = machine();
            change(&mut here);
            let e = check(&source, &here).unwrap_err();
            assert!(e.contains(needle), "{e} lacks {needle}");
        }
        // Without --disk the destination takes the source's disks.
        let mut here = machine();
        here.disks.clear();
        assert_eq!(check(&source, &here), Ok(()));
    }
}
