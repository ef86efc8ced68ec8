//! The command line (SPEC.md §3) and the machine configuration parsed from it.

use std::path::PathBuf;

use clap::Parser;
use devices::hotplug::{BarReads, InFlightPolicy, PortMode};
use devices::virtio::block::{AioBackend, ImageFormat};

/// Kernel parameters every guest gets unless `--cmdline` replaces them: the console, and the
/// switches that keep a stock kernel off instructions KVM's emulator cannot run on PVM hosts
/// (docs/guest-on-pvm.md explains each one).
///
/// The last one is for user space: with `noxsave` the guest kernel switches only the x87/SSE
/// state between tasks, while user space still sees the host's CPUID and XCR0, so two processes
/// using AVX or AVX-512 registers corrupt each other. The kernel hands `GLIBC_TUNABLES=...` to
/// /init as an environment variable, and glibc in every process then picks its SSE2 string
/// functions instead of the AVX2/EVEX ones (`resources/guest/strstress.c` checks it).
pub const DEFAULT_CMDLINE: &str = concat!(
    "console=ttyS0 quiet ",
    "noxsave clearcpuid=smap,smep,popcnt,cx16,fsgsbase,rdpid,pcid,invpcid,rdrand,rdseed,movbe,",
    "erms,fsrm,clflushopt,clwb,avx,avx2,bmi1,bmi2 nopti mitigations=off rodata=off norandmaps ",
    "GLIBC_TUNABLES=glibc.cpu.hwcaps=-AVX,-AVX2,-AVX512F,-AVX512VL,-AVX512BW,-AVX512DQ,",
    "-AVX512CD,-AVX_Fast_Unaligned_Load"
);

/// hotplug-vmm: a minimal x86_64 VMM on KVM for PCI Express hotplug research.
///
/// The guest console is on stdout (stdin goes to the guest); logs go to stderr, filtered by
/// RUST_LOG (e.g. RUST_LOG=debug). The guest powering off ends the process with status 0, and so
/// does a guest reboot (the VMM does not restart the guest).
#[derive(Parser, Debug)]
#[command(name = "hotplug-vmm", version, about, long_about = None)]
pub struct Cli {
    /// Guest kernel: an uncompressed vmlinux (ELF; PVH entry point when it has one) or a bzImage.
    /// Not needed with --incoming (the guest comes with its memory).
    #[arg(long, value_name = "PATH", required_unless_present = "incoming")]
    pub kernel: Option<PathBuf>,

    /// Initramfs (cpio archive, optionally compressed) handed to the kernel.
    #[arg(long, value_name = "PATH")]
    pub initramfs: Option<PathBuf>,

    /// Kernel command line. Replaces the default, which is printed here.
    #[arg(long, value_name = "STR", default_value = DEFAULT_CMDLINE)]
    pub cmdline: String,

    /// Guest RAM, with an optional K, M or G suffix (bytes without one).
    #[arg(long, value_name = "SIZE", default_value = "512M", value_parser = parse_size, allow_hyphen_values = true)]
    pub memory: u64,

    /// Number of vCPUs (1..=64).
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = parse_cpus, allow_hyphen_values = true)]
    pub cpus: u8,

    /// PCI Express root ports rp0..rp{N-1} with native hot-plug slots (0..=16).
    #[arg(long, value_name = "N", default_value_t = 4, value_parser = parse_root_ports, allow_hyphen_values = true)]
    pub root_ports: u8,

    /// Root port slots advertise No Command Completed Support: Slot Control writes complete at
    /// once and never set Command Completed (the guest's pciehp then does not wait for it).
    #[arg(long)]
    pub no_command_completed: bool,

    /// Who drives the root ports' slots: `native` (the guest's pciehp, through the PCIe slot
    /// registers) or `acpi` (the guest's acpiphp, through the ACPI hot-plug controller and the
    /// DSDT; the port then does not advertise Hot-Plug Capable, as on QEMU's q35 since 6.1).
    /// One mode for every port, and/or per port: e.g. `acpi`, `rp2=acpi,rp3=acpi`,
    /// `acpi,rp0=native`.
    #[arg(long, value_name = "MODE|rpN=MODE,...", default_value = "native", value_parser = parse_root_port_hotplug)]
    pub root_port_hotplug: RootPortHotplug,

    /// Whether the host bridge's _OSC grants the guest native PCIe hot-plug control. With
    /// `deny`, Linux's pciehp does not drive the native root ports (their device_del then gets
    /// no answer); ACPI slots are unaffected.
    #[arg(long, value_name = "grant|deny", default_value = "grant", value_parser = parse_grant, action = clap::ArgAction::Set)]
    pub osc_native_hotplug: bool,

    /// What x-surprise-remove does with the disk requests in flight unless the call says:
    /// `fail` completes them with an I/O error before the device vanishes (the guest's driver
    /// sees errors, then the device gone); `drop` leaves them uncompleted, as hardware pulled
    /// from its slot does (Linux's virtio_blk then waits for them forever: the removal hangs).
    #[arg(long, value_name = "fail|drop", default_value = "fail", value_parser = parse_in_flight)]
    pub surprise_in_flight: InFlightPolicy,

    /// What happens when a disk's backing file fails (host I/O errors: a network block device
    /// whose server died, a FUSE file system whose daemon is gone): `report` answers the guest's
    /// requests with I/O errors and sends X_BACKEND_ERROR; `surprise-remove` also pulls the disk
    /// out of the guest as x-surprise-remove does (requests in flight failed).
    #[arg(long = "backend-error", value_name = "report|surprise-remove", default_value = "report", value_parser = parse_backend_error, action = clap::ArgAction::Set)]
    pub remove_on_backend_error: bool,

    /// What the BARs of a disk pulled out by x-surprise-remove read afterwards, unless the call
    /// says: `zero` until the guest maps something over them (Linux's removal completes and the
    /// slot can be used again), or `all-ones` as on hardware (Linux's virtio-pci then spins
    /// forever in its reset poll: the guest's removal never completes and its hot-plug is
    /// stuck; for reproducing that hang).
    #[arg(long, value_name = "zero|all-ones", default_value = "zero", value_parser = parse_bar_reads)]
    pub surprise_bar_reads: BarReads,

    /// Seconds a device_del may go unanswered by the guest before the X_UNPLUG_STALLED event
    /// with the slot's diagnosis (1..=3600).
    #[arg(long, value_name = "SECS", default_value_t = 15, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub unplug_stall_timeout: u64,

    /// Write a JSON line per guest access to hot-plug registers, per slot state change and per
    /// control-socket request and event to FILE (resources/hotplug-timeline.py reads it).
    #[arg(long, value_name = "FILE")]
    pub hotplug_trace: Option<PathBuf>,

    /// How the disks' host I/O runs: `io_uring` (one ring per queue), `threads` (a pool of
    /// threads per queue doing preadv/pwritev, as QEMU's aio=threads), or `auto`: io_uring
    /// where the host allows it, threads otherwise. A host-side choice: a restored or migrated
    /// VM uses the destination's.
    #[arg(long, value_name = "auto|io_uring|threads", default_value = "auto", value_parser = parse_aio)]
    pub aio: AioBackend,

    /// A cold-plugged virtio-blk disk backed by a raw file: path=FILE, then optionally ,id=ID
    /// ,readonly=on ,bus=pcie.0|rpN. The id is the disk's serial (/sys/block/vdX/serial); on bus
    /// rpN the disk sits in that root port's slot and can be removed with device_del;
    /// repeatable.
    #[arg(long, value_name = "path=FILE[,id=ID][,readonly=on][,bus=BUS]", value_parser = parse_disk)]
    pub disk: Vec<DiskSpec>,

    /// Control socket: a Unix socket at PATH speaking QMP (SPEC.md §5), several clients at once.
    #[arg(long, value_name = "PATH")]
    pub qmp: Option<PathBuf>,

    /// Start with the vCPUs stopped (`query-status` says "paused") until the control socket's
    /// `cont`, as QEMU's -S.
    #[arg(short = 'S', long)]
    pub paused: bool,

    /// Take the guest from a snapshot or a migration instead of booting: unix:PATH (listen
    /// there for a `migrate` from another hotplug-vmm), exec:COMMAND (read the output of
    /// `sh -c COMMAND`, e.g. "exec:cat FILE"), file:PATH (a file written by `migrate file:`,
    /// mapped rather than read), or defer (wait for the control socket's
    /// `migrate-incoming`). The machine options (--cpus, --memory, --root-ports,
    /// --root-port-hotplug, --osc-native-hotplug, --no-command-completed) must be the
    /// source's; the disks come with the guest (--disk may repeat the source's or be left out).
    /// The guest runs afterwards if it ran when the source's migration started, unless -S.
    #[arg(long, value_name = "URI")]
    pub incoming: Option<String>,

    /// Where the guest console goes: stdio (stdout, with stdin as input), null, or file=PATH.
    #[arg(long, value_name = "stdio|null|file=PATH", default_value = "stdio", value_parser = parse_serial)]
    pub serial: SerialMode,
}

/// A `--root-port-hotplug` argument: a mode for every port, with per-port exceptions.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RootPortHotplug {
    /// The mode of ports not named.
    pub default: PortMode,
    /// Modes of named ports, by port number (rpN).
    pub ports: std::collections::BTreeMap<u8, PortMode>,
}

impl RootPortHotplug {
    /// The mode of root port rp`n`.
    pub fn mode(&self, n: u8) -> PortMode {
        self.ports.get(&n).copied().unwrap_or(self.default)
    }

    /// Checks that every port named exists when there are `root_ports` of them.
    pub fn check(&self, root_ports: u8) -> Result<(), String> {
        match self.ports.keys().find(|&&n| n >= root_ports) {
            Some(n) => Err(format!(
                "--root-port-hotplug names rp{n}, but there are {root_ports} root ports (rp0..rp{})",
                root_ports.saturating_sub(1)
            )),
            None => Ok(()),
        }
    }
}

fn parse_mode(s: &str) -> Result<PortMode, String> {
    s.parse()
}

/// Parses `MODE`, `rpN=MODE` or a comma-separated list of them.
pub fn parse_root_port_hotplug(s: &str) -> Result<RootPortHotplug, String> {
    let mut out = RootPortHotplug::default();
    let mut default_seen = false;
    for part in s.split(',') {
        match part.split_once('=') {
            None => {
                if std::mem::replace(&mut default_seen, true) {
                    return Err(format!("'{s}' gives the default mode twice"));
                }
                out.default = parse_mode(part)?;
            }
            Some((port, mode)) => {
                let n = port
                    .strip_prefix("rp")
                    .and_then(|n| n.parse::<u8>().ok())
                    .filter(|n| *n < MAX_ROOT_PORTS && !port[2..].starts_with('+'))
                    .ok_or_else(|| {
                        format!(
                            "'{port}' is not a root port id (rp0..rp{})",
                            MAX_ROOT_PORTS - 1
                        )
                    })?;
                if out.ports.insert(n, parse_mode(mode)?).is_some() {
                    return Err(format!("rp{n} is given twice in '{s}'"));
                }
            }
        }
    }
    Ok(out)
}

fn parse_bar_reads(s: &str) -> Result<BarReads, String> {
    s.parse()
}

fn parse_aio(s: &str) -> Result<AioBackend, String> {
    AioBackend::from_name(s)
        .ok_or_else(|| format!("'{s}' is not an I/O engine (auto, io_uring, threads)"))
}

fn parse_in_flight(s: &str) -> Result<InFlightPolicy, String> {
    s.parse()
}

/// `report` (false) or `surprise-remove` (true): `--backend-error` and device_add's
/// `x-backend-error`.
pub fn parse_backend_error(s: &str) -> Result<bool, String> {
    match s {
        "report" => Ok(false),
        "surprise-remove" => Ok(true),
        _ => Err(format!("'{s}' is not report or surprise-remove")),
    }
}

fn parse_grant(s: &str) -> Result<bool, String> {
    match s {
        "grant" => Ok(true),
        "deny" => Ok(false),
        _ => Err(format!("'{s}' is not grant or deny")),
    }
}

/// Destination of the guest console.
#[derive(Clone, Debug, PartialEq)]
pub enum SerialMode {
    /// stdout for output, stdin for input.
    Stdio,
    /// Output discarded, no input.
    Null,
    /// Output written to a file, no input.
    File(PathBuf),
}

/// A `--disk` argument.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskSpec {
    /// The image file.
    pub path: PathBuf,
    /// `format=`: its format; probed when not given (qcow2 by its header, raw otherwise).
    pub format: Option<ImageFormat>,
    /// The device id, also its serial; `disk<N>` when not given.
    pub id: Option<String>,
    /// Whether the guest may only read it.
    pub readonly: bool,
    /// The bus it sits on: `pcie.0` (the root bus) or a root port id.
    pub bus: String,
}

/// Longest device id: it is also the virtio-blk serial, which has 20 bytes (VIRTIO_BLK_ID_BYTES).
pub const MAX_ID_LEN: usize = 20;

/// Checks a user-given device id: 1..=20 of `[A-Za-z0-9_.-]`, starting with a letter.
pub fn check_id(id: &str) -> Result<(), String> {
    let ok = id.len() <= MAX_ID_LEN
        && id.starts_with(|c: char| c.is_ascii_alphabetic())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "'{id}' is not a valid id (1 to {MAX_ID_LEN} letters, digits, '_', '.' or '-', starting with a letter)"
        ))
    }
}

/// Parses `path=FILE[,format=raw|qcow2][,id=ID][,readonly=on|off][,bus=BUS]`.
pub fn parse_disk(s: &str) -> Result<DiskSpec, String> {
    let mut disk = DiskSpec {
        path: PathBuf::new(),
        format: None,
        id: None,
        readonly: false,
        bus: "pcie.0".to_string(),
    };
    for part in s.split(',') {
        let (key, value) = part
            .split_once('=')
            .ok_or_else(|| format!("'{part}' in --disk is not key=value"))?;
        match key {
            "path" if !value.is_empty() => disk.path = PathBuf::from(value),
            "format" => {
                disk.format =
                    Some(ImageFormat::from_name(value).ok_or_else(|| {
                        format!("format={value}: not an image format (raw, qcow2)")
                    })?)
            }
            "id" => {
                check_id(value)?;
                disk.id = Some(value.to_string());
            }
            "readonly" => {
                disk.readonly = match value {
                    "on" | "true" | "yes" => true,
                    "off" | "false" | "no" => false,
                    _ => return Err(format!("readonly={value}: use on or off")),
                }
            }
            "bus" if !value.is_empty() => disk.bus = value.to_string(),
            "path" | "bus" => return Err(format!("{key}= needs a value")),
            _ => {
                return Err(format!(
                    "unknown --disk key '{key}' (path, format, id, readonly, bus)"
                ))
            }
        }
    }
    if disk.path.as_os_str().is_empty() {
        return Err("--disk needs path=FILE".to_string());
    }
    Ok(disk)
}

/// Smallest guest RAM we accept: the kernel, its page tables and the initramfs must fit.
pub const MIN_MEMORY: u64 = 64 << 20;
/// Largest guest RAM we accept.
pub const MAX_MEMORY: u64 = 1 << 40;
/// Most vCPUs: the MADT, the CPUID topology and the guest kernel (NR_CPUS) are sized for this.
pub const MAX_CPUS: u8 = 64;

/// Parses "512M", "1G", "65536K", "1048576".
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (digits, shift) = match t.char_indices().last() {
        Some((i, 'k' | 'K')) => (&t[..i], 10),
        Some((i, 'm' | 'M')) => (&t[..i], 20),
        Some((i, 'g' | 'G')) => (&t[..i], 30),
        _ => (t, 0),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("'{s}' is not a size (use e.g. 512M or 2G)"))?;
    let bytes = n
        .checked_mul(1u64 << shift)
        .ok_or_else(|| format!("'{s}' is too large"))?;
    if bytes < MIN_MEMORY {
        return Err(format!(
            "'{s}' is less than the minimum of {}M",
            MIN_MEMORY >> 20
        ));
    }
    if bytes > MAX_MEMORY {
        return Err(format!(
            "'{s}' is more than the maximum of {}G",
            MAX_MEMORY >> 30
        ));
    }
    if bytes % 4096 != 0 {
        return Err(format!("'{s}' is not a multiple of 4K"));
    }
    Ok(bytes)
}

fn parse_cpus(s: &str) -> Result<u8, String> {
    match s.trim().parse::<u8>() {
        Ok(n) if (1..=MAX_CPUS).contains(&n) => Ok(n),
        _ => Err(format!("'{s}' is not a vCPU count from 1 to {MAX_CPUS}")),
    }
}

/// Most root ports: they sit at device numbers 0x10.. of bus 0.
pub const MAX_ROOT_PORTS: u8 = 16;

fn parse_root_ports(s: &str) -> Result<u8, String> {
    match s.trim().parse::<u8>() {
        Ok(n) if n <= MAX_ROOT_PORTS => Ok(n),
        _ => Err(format!(
            "'{s}' is not a root port count from 0 to {MAX_ROOT_PORTS}"
        )),
    }
}

fn parse_serial(s: &str) -> Result<SerialMode, String> {
    match s {
        "stdio" => Ok(SerialMode::Stdio),
        "null" => Ok(SerialMode::Null),
        _ => match s.strip_prefix("file=") {
            Some(p) if !p.is_empty() => Ok(SerialMode::File(PathBuf::from(p))),
            _ => Err(format!("'{s}' is not stdio, null or file=PATH")),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("131072k"), Ok(128 << 20));
        assert_eq!(parse_size("134217728"), Ok(128 << 20));
        for bad in ["", "M", "12X", "-1G", "1M", "99999999999G", "67108865"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn aio() {
        assert_eq!(parse_aio("io_uring"), Ok(AioBackend::IoUring));
        assert_eq!(parse_aio("threads"), Ok(AioBackend::Threads));
        assert_eq!(parse_aio("auto"), Ok(AioBackend::Auto));
        let err = parse_aio("native").unwrap_err();
        assert!(err.contains("auto, io_uring, threads"), "{err}");
        let cli = Cli::try_parse_from(["hotplug-vmm", "--kernel", "k"]).unwrap();
        assert_eq!(cli.aio, AioBackend::Auto);
    }

    /// The defaults are the ones the supported guests survive (issue 21): a surprise removal
    /// fails the requests in flight (with `drop` Linux's virtio_blk waits for them forever) and
    /// leaves BARs reading zero (with all-ones Linux's virtio-pci spins in `vp_reset`).
    #[test]
    fn surprise_defaults_are_the_ones_linux_survives() {
        let cli = Cli::try_parse_from(["hotplug-vmm", "--kernel", "k"]).unwrap();
        assert_eq!(cli.surprise_bar_reads, BarReads::Zero);
        assert_eq!(cli.surprise_in_flight, InFlightPolicy::Fail);
        assert!(!cli.remove_on_backend_error);
        assert_eq!(BarReads::default(), cli.surprise_bar_reads);
        let cli = Cli::try_parse_from([
            "hotplug-vmm",
            "--kernel",
            "k",
            "--surprise-bar-reads",
            "all-ones",
        ])
        .unwrap();
        assert_eq!(cli.surprise_bar_reads, BarReads::AllOnes);
    }

    #[test]
    fn cpus_and_serial() {
        assert_eq!(parse_cpus("2"), Ok(2));
        assert!(parse_cpus("0").is_err());
        assert!(parse_cpus("65").is_err());
        assert!(parse_cpus("x").is_err());
        assert_eq!(parse_root_ports("0"), Ok(0));
        assert_eq!(parse_root_ports("16"), Ok(16));
        assert!(parse_root_ports("17").is_err());
        assert!(parse_root_ports("-1").is_err());
        assert_eq!(parse_serial("null"), Ok(SerialMode::Null));
        assert_eq!(
            parse_serial("file=/tmp/x"),
            Ok(SerialMode::File("/tmp/x".into()))
        );
        assert!(parse_serial("file=").is_err());
        assert!(parse_serial("tcp").is_err());
    }

    #[test]
    fn root_port_hotplug() {
        let all_native = parse_root_port_hotplug("native").unwrap();
        assert_eq!(all_native, RootPortHotplug::default());
        let acpi = parse_root_port_hotplug("acpi").unwrap();
        assert_eq!(
            (acpi.mode(0), acpi.mode(15)),
            (PortMode::Acpi, PortMode::Acpi)
        );
        let mixed = parse_root_port_hotplug("rp2=acpi,rp3=acpi").unwrap();
        assert_eq!(
            (0..4).map(|n| mixed.mode(n)).collect::<Vec<_>>(),
            [
                PortMode::Native,
                PortMode::Native,
                PortMode::Acpi,
                PortMode::Acpi
            ]
        );
        assert!(mixed.check(4).is_ok());
        assert!(mixed.check(3).unwrap_err().contains("rp3"));
        let except = parse_root_port_hotplug("acpi,rp0=native").unwrap();
        assert_eq!(
            (except.mode(0), except.mode(1)),
            (PortMode::Native, PortMode::Acpi)
        );
        for bad in [
            "",
            "shpc",
            "acpi,native",
            "rp1=acpi,rp1=native",
            "rp16=acpi",
            "rp=acpi",
            "rpx=acpi",
            "rp+1=acpi",
            "1=acpi",
            "rp1=",
            "rp1=both",
            "rp1",
        ] {
            assert!(parse_root_port_hotplug(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_grant("deny"), Ok(false));
        assert!(parse_grant("no").is_err());
    }

    #[test]
    fn disks() {
        let d = parse_disk("path=/a b.img,id=data0,readonly=on").unwrap();
        assert_eq!(d.path, PathBuf::from("/a b.img"));
        assert_eq!(d.id.as_deref(), Some("data0"));
        assert!(d.readonly);
        assert_eq!(d.bus, "pcie.0");
        assert_eq!(parse_disk("path=x,bus=rp1").unwrap().bus, "rp1");
        assert_eq!(d.format, None, "probed");
        let q = parse_disk("path=x.qcow2,format=qcow2").unwrap();
        assert_eq!(q.format, Some(ImageFormat::Qcow2));
        assert_eq!(
            parse_disk("format=raw,path=x").unwrap().format,
            Some(ImageFormat::Raw)
        );
        assert!(parse_disk("path=x,format=vmdk")
            .unwrap_err()
            .contains("raw, qcow2"));
        for bad in [
            "",
            "id=a",
            "path=",
            "path=x,readonly=maybe",
            "path=x,id=",
            "path=x,id=0abc",
            "path=x,id=waaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaay-too-long",
            "path=x,id=a b",
            "path=x,colour=red",
            "path=x,bus=",
            "path=x,junk",
            "path=x,format=",
            "path=x,format=QCOW2",
        ] {
            assert!(parse_disk(bad).is_err(), "{bad}");
        }
    }
}
