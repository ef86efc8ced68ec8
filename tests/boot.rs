//! Boots the test kernels with 1 and 2 vCPUs, to user space, and checks everything in that one
//! boot (boots are slow on PVM hosts): from the guest kernel's own log (its dmesg), that ACPI and
//! PCI Express come up as SPEC.md §4 requires — the ACPI interpreter with our DSDT, no ACPI or
//! firmware errors, `_OSC` granting native PCIe hotplug, MMCONFIG used and reserved, the host
//! bridge enumerated, every vCPU brought up; from /sys, the same machine; that two cold-plugged
//! virtio-blk disks read back the host's data, take O_DIRECT writes (or refuse them when
//! read-only) and show their ids as serials; and that `poweroff -f` ends the VMM with status 0.

use crate::common;

use std::time::Duration;

use common::{BootOptions, Guest};

fn kernel_boot(version: &str, cpus: u8) {
    kernel_boot_with(version, cpus, BootOptions::new(version));
}

/// Sector `n` of a disk made by `common::make_mbr_disk` (outside its partition table).
fn pattern_byte(sector: u64) -> u8 {
    (sector % 251) as u8
}

/// The bytes of vda the guest zeroes with BLKZEROOUT: inside the first partition, away from the
/// sectors the test reads and writes, and not all zero before.
const ZEROED: std::ops::Range<usize> = 5000 * 512..5032 * 512;

/// Bytes the host file system has allocated to `path`.
fn allocated_bytes(path: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().blocks() * 512
}

fn kernel_boot_with(version: &str, cpus: u8, opts: BootOptions) {
    if !common::kernel_versions().iter().any(|v| v == version) {
        eprintln!("kernel {version} not selected by HOTPLUG_VMM_KERNELS");
        return;
    }
    // Two cold-plugged disks: the guest kernel reads their partition tables at probe time, then
    // user space reads, writes and syncs through the whole data path (virtio-pci, MSI-X,
    // ioeventfd, the I/O thread).
    let image = opts
        .kernel
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let dir = common::TempDir::new(&format!("boot-{version}-{cpus}-{image}"));
    let (rw, ro) = (dir.path("rw.img"), dir.path("ro.img"));
    let mut rw_image = common::make_mbr_disk(&rw, 64, &[16, 8]);
    let ro_image = common::make_mbr_disk(&ro, 16, &[4]);
    // An empty ext4 made on the host (written out in full, so that discards show as holes).
    let fs = dir.path("fs.img");
    std::fs::write(&fs, vec![0u8; 64 << 20]).unwrap();
    let tools = dir.path("tools");
    std::fs::create_dir(&tools).unwrap();
    common::build_guest_tool("strstress", &tools);
    common::hotplug::format_ext4_with(&fs, Some(&tools));
    let fs_blocks_before = allocated_bytes(&fs);
    let mut opts = opts.cpus(cpus);
    opts.extra_args.extend([
        "--disk".to_string(),
        format!("path={},id=data0", rw.display()),
        "--disk".to_string(),
        format!("path={},id=ro0,readonly=on", ro.display()),
        "--disk".to_string(),
        format!("path={},id=fs0", fs.display()),
    ]);
    let (mut g, ready) = Guest::boot(&opts);
    eprintln!("{version}/{cpus}cpu: {ready}");
    assert!(ready.contains(&format!(" kernel={version}.")), "{ready}");
    assert!(ready.ends_with(&format!(" cpus={cpus}")), "{ready}");

    // The kernel log, as the guest's dmesg has it (prefixed so that the harness does not take
    // its lines for forwarded kernel messages).
    let dmesg = g.run("dmesg | sed 's/^/K: /'");
    let log: Vec<String> = dmesg
        .lines()
        .filter_map(|l| l.strip_prefix("K: "))
        .map(str::to_string)
        .collect();
    let text = log.join("\n");
    let has = |needle: &str| log.iter().any(|l| l.contains(needle));
    let line = |needle: &str| {
        log.iter()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no {needle:?} in the guest's dmesg:\n{text}"))
            .clone()
    };

    assert!(line("Linux version").contains(&format!("Linux version {version}.")));
    let cmdline = line("Command line:");
    for bad in ["acpi=", "pci=", "pcie_ports="] {
        assert!(
            !cmdline.contains(bad),
            "workaround on the command line: {cmdline}"
        );
    }
    for bad in [
        "ACPI Error",
        "ACPI BIOS Error",
        "FW_BUG",
        "Firmware Bug",
        "firmware bug",
    ] {
        let hits: Vec<&String> = log.iter().filter(|l| l.contains(bad)).collect();
        assert!(hits.is_empty(), "guest log has {bad:?}: {hits:#?}");
    }

    // ACPI: our tables, the interpreter, S5 for power-off, the PCIe host bridge.
    for table in ["RSDP", "XSDT", "FACP", "DSDT", "APIC", "MCFG"] {
        assert!(
            has(&format!("ACPI: {table} ")),
            "ACPI table {table} not listed:\n{text}"
        );
    }
    line("ACPI: Interpreter enabled");
    // The MP table in the last KiB of base memory, where Linux's scan finds it before it
    // walks the BIOS area 16 bytes at a time (vmm/src/mptable.rs).
    line("found SMP MP-table at [mem 0x0009fc00-0x0009fc0f]");
    assert!(line("ACPI: PM: (supports").contains("S5"));
    assert!(line("ACPI: PCI Root Bridge [PCI0]").contains("[bus 00-ff]"));
    let osc = line("_OSC: OS now controls");
    assert!(osc.contains("PCIeHotplug"), "{osc}");
    assert!(osc.contains("PCIeCapability"), "{osc}");

    // ECAM: described by MCFG, reserved, and used (6.1 calls it MMCONFIG, 6.12 ECAM).
    let ecam = |l: &String| {
        (l.contains("PCI: MMCONFIG") || l.contains("PCI: ECAM"))
            && l.contains("0xe0000000-0xefffffff")
    };
    assert!(
        log.iter()
            .any(|l| ecam(l) && l.contains("domain 0000 [bus 00-ff]")),
        "ECAM not described:\n{text}"
    );
    assert!(
        log.iter().any(|l| ecam(l) && l.contains("reserved")),
        "ECAM not reserved:\n{text}"
    );
    assert!(!has("not reserved") && !has("not using"), "{text}");
    // The host bridge, as the guest enumerated it.
    assert!(
        line("pci 0000:00:00.0:").contains("[1b36:0008] type 00 class 0x060000"),
        "{text}"
    );
    for window in [
        "[io  0x1000-0xffff window]",
        "[mem 0xc0000000-0xdfffffff window]",
        "[bus 00-ff]",
    ] {
        assert!(
            log.iter()
                .any(|l| l.contains("root bus resource") && l.contains(window)),
            "host bridge window {window} missing:\n{text}"
        );
    }

    // Every vCPU came up.
    let smp = line("smp: Brought up");
    assert!(smp.contains(&format!("{cpus} CPU")), "{smp}");
    // The console UART, found through the DSDT (PNP0501, so that its interrupt is mapped: the
    // harness's shell depends on it).
    assert!(
        line("ttyS0 at I/O 0x3f8").contains("] 00:"),
        "ttyS0 not probed through ACPI:\n{text}"
    );

    // The disks: enumerated as modern virtio-blk (1af4:1042, mass storage), driven with MSI-X,
    // sized from their files, partition tables read through the data path.
    for (slot, name, sectors, parts) in [
        ("01", "vda", 131072, " vda: vda1 vda2"),
        ("02", "vdb", 32768, " vdb: vdb1"),
    ] {
        assert!(
            line(&format!("pci 0000:00:{slot}.0:")).contains("[1af4:1042] type 00 class 0x010000"),
            "{text}"
        );
        let blk = line(&format!("[{name}] "));
        assert!(
            blk.contains(&format!("[{name}] {sectors} 512-byte logical blocks")),
            "{blk}"
        );
        assert!(
            log.iter().any(|l| l.ends_with(parts)),
            "{name}'s partition table not read ({parts:?}):\n{text}"
        );
    }
    if cpus > 1 {
        // One request queue per vCPU (VIRTIO_BLK_F_MQ).
        let queues = line("default/read/poll queues");
        assert!(queues.contains(&format!("{cpus}/0/0")), "{queues}");
    }
    let complaints: Vec<&String> = log
        .iter()
        .filter(|l| l.contains("virtio") && (l.contains("fail") || l.contains("error")))
        .collect();
    assert!(complaints.is_empty(), "{complaints:#?}");

    // Four root ports (the default), each with a native hot-plug slot that the guest's pciehp
    // drives: bus numbers and windows assigned by the guest, the slot's capabilities as
    // advertised, and no command that failed to complete.
    for n in 0..4u8 {
        let port = format!("0000:00:{:02x}.0", 0x10 + n);
        assert!(
            line(&format!("pci {port}:")).contains("[1b36:000c] type 01 class 0x060400"),
            "{text}"
        );
        assert!(
            line(&format!("pcieport {port}: pciehp: Slot #{n} ")).contains(
                "AttnBtn+ PwrCtrl+ MRL- AttnInd+ PwrInd+ HotPlug+ Surprise+ Interlock- NoCompl- IbPresDis- LLActRep+"
            ),
            "{text}"
        );
    }
    let pciehp_complaints: Vec<&String> = log
        .iter()
        .filter(|l| {
            l.contains("pciehp")
                && (l.contains("Timeout") || l.contains("not completed") || l.contains("fail"))
        })
        .collect();
    assert!(pciehp_complaints.is_empty(), "{pciehp_complaints:#?}");

    // User space sees the same machine.
    // pciehp's slots of rp0..rp3, then acpiphp's of root bus devices 1..15 (_SUN 32 + device).
    let slots: Vec<String> = (0..4).chain(33..48).map(|n| n.to_string()).collect();
    assert_eq!(
        g.run("for s in /sys/bus/pci/slots/*; do echo ${s##*/}; done | sort -n | tr '\\n' ' '")
            .trim(),
        slots.join(" ")
    );
    let pci = g.run("echo /sys/bus/pci/devices/*");
    for dev in ["0000:00:00.0", "0000:00:01.0", "0000:00:02.0"] {
        assert!(
            pci.contains(dev),
            "{dev} not in /sys/bus/pci/devices: {pci}"
        );
    }
    assert_eq!(
        g.run("cat /sys/bus/pci/devices/0000:00:01.0/vendor"),
        "0x1af4"
    );
    assert_eq!(g.run("grep -c ^processor /proc/cpuinfo"), cpus.to_string());
    // GET_ID: the disk ids are their serials.
    assert_eq!(g.run("cat /sys/block/vda/serial"), "data0");
    assert_eq!(g.run("cat /sys/block/vdb/serial"), "ro0");
    assert_eq!(g.run("cat /sys/block/vdb/ro"), "1");
    assert_eq!(g.run("cat /sys/block/vda/size"), "131072");

    // Reads: sectors the host filled with a known pattern come back exactly.
    for sector in [2048u64, 40000, 131071] {
        let hex = g.run(&format!(
            "dd if=/dev/vda bs=512 skip={sector} count=1 iflag=direct 2>/dev/null | od -An -v -tx1 | tr -d ' \\n'"
        ));
        let want: String =
            std::iter::repeat_n(format!("{:02x}", pattern_byte(sector)), 512).collect();
        assert_eq!(hex, want, "sector {sector} of vda");
    }
    // Writes: O_DIRECT, then synced, must be in the file after power-off.
    g.run("printf 'hotplug-vmm was here' > /tmp/msg && dd if=/tmp/msg of=/dev/vda bs=512 seek=3000 conv=sync oflag=direct 2>/dev/null && sync");
    // The read-only disk refuses writes.
    let (out, status) = g.run_status(
        "dd if=/tmp/msg of=/dev/vdb bs=512 seek=100 conv=sync oflag=direct",
        Duration::from_secs(120),
    );
    assert_ne!(status, 0, "write to a read-only disk succeeded: {out}");
    // WRITE_ZEROES: BLKZEROOUT on 16 KiB of vda (the block layer sends WRITE_ZEROES when the
    // device offers it; the host checks the range after power-off).
    let (out, status) = g.run_status(
        &format!(
            "/sbin/blkzeroout /dev/vda {} {}",
            ZEROED.start,
            ZEROED.len()
        ),
        Duration::from_secs(120),
    );
    assert_eq!(status, 0, "BLKZEROOUT on vda: {out}");
    // A file system round trip: mount, write, trim, unmount (FLUSH from ext4's journal commits
    // and sync, DISCARD from fstrim, which sends the free blocks to the device).
    g.run("mount -t ext4 /dev/vdc /mnt && echo 'hello from the guest' > /mnt/greeting && dd if=/dev/zero of=/mnt/blob bs=64k count=16 2>/dev/null && sync");
    let trim = g.run("fstrim -v /mnt");
    let trimmed: u64 = trim
        .split_whitespace()
        .find_map(|w| w.parse().ok())
        .unwrap_or_else(|| panic!("fstrim -v: {trim}"));
    assert!(
        trimmed > 32 << 20,
        "fstrim discarded most of the free space: {trim}"
    );
    // User space's vector state survives preemption: three processes at once hammer glibc's
    // string functions and check every result. With `noxsave` the guest kernel does not switch
    // AVX state, so this fails (most runs, on AVX-512 hosts) unless the default command line's
    // GLIBC_TUNABLES keeps glibc on its SSE2 variants (vmm/src/config.rs).
    let stress = g.run(
        "echo \"tunables=$GLIBC_TUNABLES\"; for i in 1 2 3; do /mnt/strstress 1000000 & done; wait",
    );
    assert!(
        stress.contains("tunables=glibc.cpu.hwcaps=-AVX,"),
        "/init's environment lacks the kernel command line's GLIBC_TUNABLES: {stress}"
    );
    assert_eq!(
        stress.matches("strstress: ok").count(),
        3,
        "glibc string functions gave wrong results under preemption: {stress}"
    );
    g.run("umount /mnt");

    // `poweroff -f` ends the VMM with status 0.
    let status = g.poweroff();
    assert_eq!(
        status.code(),
        Some(0),
        "poweroff -f must end the VMM with 0"
    );
    let msg = b"hotplug-vmm was here";
    let at = 3000 * 512;
    rw_image[at..at + 512].fill(0);
    rw_image[at..at + msg.len()].copy_from_slice(msg);
    rw_image[ZEROED].fill(0);
    let after = std::fs::read(&rw).unwrap();
    assert!(
        after == rw_image,
        "vda's file differs from what the guest wrote"
    );
    assert_eq!(std::fs::read(&ro).unwrap(), ro_image, "vdb changed");
    // The discarded blocks are holes in the host file now (DISCARD punches them).
    let fs_blocks_after = allocated_bytes(&fs);
    assert!(
        fs_blocks_after + (32 << 20) < fs_blocks_before,
        "fstrim's discards reached the host file: {fs_blocks_before} -> {fs_blocks_after} bytes allocated"
    );
    // The host finds the filesystem clean and the file intact.
    common::host_run(std::process::Command::new("e2fsck").arg("-fn").arg(&fs));
    let greeting = common::host_run(
        std::process::Command::new("debugfs")
            .args(["-R", "cat /greeting"])
            .arg(&fs),
    );
    assert_eq!(greeting, "hello from the guest\n");
}

#[test]
fn linux_6_1_two_vcpus() {
    kernel_boot("6.1", 2);
}

#[test]
fn linux_6_12_one_vcpu() {
    kernel_boot("6.12", 1);
}

#[test]
fn linux_6_12_two_vcpus() {
    kernel_boot("6.12", 2);
}

/// 6.1 with one vCPU boots as a bzImage (64-bit boot protocol, setup header from the image, LZ4
/// decompressor running in the guest) instead of the vmlinux's PVH entry: every other test
/// boots 6.1's vmlinux with one vCPU, so this one covers the other format without a boot of
/// its own.
#[test]
fn linux_6_1_one_vcpu_bzimage() {
    let mut opts = BootOptions::new("6.1");
    opts.kernel = common::bzimage("6.1");
    kernel_boot_with("6.1", 1, opts);
}

#[test]
fn harness_tells_async_lines_from_command_output() {
    assert!(common::is_async_line(
        "[   12.345678] virtio_blk virtio0: [vda] 2048 sectors"
    ));
    assert!(common::is_async_line("BLOCK-ADD vda uptime=12.34"));
    assert!(!common::is_async_line("[1b36:0008]"));
    assert!(!common::is_async_line("0x060000"));
}

/// A kernel line that arrives while a command's output line is open (here `cat` of a sysfs
/// attribute, which has no newline, before the harness's `echo` ends it) comes out whole, and
/// the command's line goes on where it left off. (The CI run of 09be00e read a disk's serial as
/// "stuck[   68.223416] clocksource: ...".)
#[test]
fn harness_takes_marked_lines_out_of_open_ones() {
    let mut con = common::Console::default();
    let stream = b"@@B7\r\nstu\x01[   68.223416] clocksource: skew\r\nck\r\n\x01BLOCK-ADD vdb uptime=1.2\r\n~ # \x01BLOCK-REMOVE vdb uptime=2.3\r\necho\r\n";
    for &b in stream {
        con.push_byte(b, std::time::Duration::ZERO);
    }
    let lines: Vec<&str> = con.lines().collect();
    assert_eq!(
        lines,
        [
            "@@B7",
            "[   68.223416] clocksource: skew",
            "stuck",
            "BLOCK-ADD vdb uptime=1.2",
            "BLOCK-REMOVE vdb uptime=2.3",
            "~ # echo",
        ]
    );
}
