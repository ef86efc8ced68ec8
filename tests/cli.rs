//! Bad command lines end the VMM with a one-line error naming the problem and a non-zero status,
//! never a panic (SPEC.md §3). No guest is booted.

use std::process::Command;

fn run(args: &[&str]) -> (i32, String) {
    run_command(Command::new(env!("CARGO_BIN_EXE_hotplug-vmm")).args(args))
}

fn run_command(command: &mut Command) -> (i32, String) {
    let out = command.output().expect("run hotplug-vmm");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The VMM as a user whom file permissions apply to: `nobody` when the tests run as root
/// (who may open any file), the user itself otherwise.
fn run_unprivileged(args: &[&str]) -> (i32, String) {
    use std::os::unix::process::CommandExt;
    let mut command = Command::new(env!("CARGO_BIN_EXE_hotplug-vmm"));
    command.args(args);
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        command.uid(65534).gid(65534);
    }
    run_command(&mut command)
}

fn assert_one_line_error(args: &[&str], needle: &str) {
    assert_one_line_error_of(run(args), args, needle);
}

fn assert_one_line_error_of((code, err): (i32, String), args: &[&str], needle: &str) {
    assert_ne!(code, 0, "{args:?} must fail");
    assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(
        lines.iter().any(|l| l.contains(needle)),
        "{args:?}: expected {needle:?} in {err}"
    );
    // clap adds a usage hint after its error line; our own errors are exactly one line.
    let ours = !err.starts_with("error:");
    if ours {
        assert_eq!(lines.len(), 1, "{args:?}: more than one line: {err}");
    }
}

fn temp_file(name: &str, contents: &[u8]) -> String {
    let p = std::env::temp_dir().join(format!("hotplug-vmm-cli-{}-{name}", std::process::id()));
    std::fs::write(&p, contents).unwrap();
    p.display().to_string()
}

#[test]
fn missing_kernel_file() {
    assert_one_line_error(
        &["--kernel", "/nonexistent/vmlinux"],
        "/nonexistent/vmlinux",
    );
}

#[test]
fn kernel_that_is_not_a_kernel() {
    let k = temp_file("bogus-kernel", b"not an ELF and not a bzImage");
    assert_one_line_error(&["--kernel", &k], "not an x86_64 ELF vmlinux or bzImage");
}

#[test]
fn unreadable_initramfs() {
    let k = temp_file("k", b"x");
    assert_one_line_error(
        &["--kernel", &k, "--initramfs", "/nonexistent/initrd"],
        "/nonexistent/initrd",
    );
}

#[test]
fn bad_memory_sizes() {
    for bad in ["lots", "0", "1M", "12X", "99999999G"] {
        assert_one_line_error(&["--kernel", "k", "--memory", bad], "--memory");
    }
}

#[test]
fn bad_cpu_counts() {
    for bad in ["0", "65", "-1", "two"] {
        assert_one_line_error(&["--kernel", "k", "--cpus", bad], "--cpus");
    }
}

#[test]
fn bad_serial_mode() {
    assert_one_line_error(&["--kernel", "k", "--serial", "tcp:1234"], "--serial");
}

#[test]
fn bad_hotplug_modes() {
    for bad in ["shpc", "rp1=maybe", "rp1=acpi,rp1=native", "port1=acpi"] {
        assert_one_line_error(
            &["--kernel", "k", "--root-port-hotplug", bad],
            "--root-port-hotplug",
        );
    }
    // A port the machine does not have: checked before the kernel is loaded.
    let k = temp_file("rph-kernel", b"not a kernel");
    assert_one_line_error(
        &[
            "--kernel",
            &k,
            "--root-ports",
            "2",
            "--root-port-hotplug",
            "rp2=acpi",
        ],
        "names rp2, but there are 2 root ports",
    );
    assert_one_line_error(
        &["--kernel", "k", "--osc-native-hotplug", "maybe"],
        "--osc-native-hotplug",
    );
}

#[test]
fn kernel_is_required_and_help_documents_every_flag() {
    assert_one_line_error(&[], "--kernel");
    let out = Command::new(env!("CARGO_BIN_EXE_hotplug-vmm"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--kernel",
        "--initramfs",
        "--cmdline",
        "--memory",
        "--cpus",
        "--serial",
        "--root-ports",
        "--root-port-hotplug",
        "--osc-native-hotplug",
        "--no-command-completed",
        "--disk",
        "--qmp",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}");
    }
}

/// A `--disk` path that is no disk stops the VMM with one line naming it, before the kernel is
/// read (the kernel here is not one, and its error would come otherwise), and never waits on
/// it: a FIFO used to block the VMM's start for good in `open`.
#[test]
fn bad_disk_paths() {
    let k = temp_file("disk-kernel", b"not a kernel");
    let dir = std::env::temp_dir().join(format!("hotplug-vmm-cli-{}-disks", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let fifo = dir.join("fifo");
    let status = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(status.success());
    let vmdk = dir.join("x.vmdk");
    std::fs::write(&vmdk, [b"KDMV".as_slice(), &[0; 508]].concat()).unwrap();
    let not_qcow2 = dir.join("raw.img");
    std::fs::write(&not_qcow2, [0u8; 4096]).unwrap();
    let d = |p: &std::path::Path, opts: &str| format!("path={}{opts}", p.display());
    for (disk, needle) in [
        (d(&dir, ""), "it is a directory"),
        (d(&dir, ",readonly=on"), "it is a directory"),
        (d(&fifo, ""), "it is a FIFO"),
        (d(&fifo, ",readonly=on"), "it is a FIFO"),
        (d(&dir.join("missing.img"), ""), "No such file or directory"),
        (d(std::path::Path::new("/dev/null"), ""), "character device"),
        (d(&vmdk, ""), "vmdk image, which is not supported"),
        (d(&not_qcow2, ",format=qcow2"), "qcow2"),
    ] {
        assert_one_line_error(&["--kernel", &k, "--disk", &disk], "--disk");
        assert_one_line_error(&["--kernel", &k, "--disk", &disk], needle);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// An image the user may not open as asked: the open's own error, in one line, before the
/// kernel is read; read-only access to a read-only file is enough for `readonly=on`.
#[test]
fn a_disk_without_permission() {
    use std::os::unix::fs::PermissionsExt;
    let k = temp_file("perm-kernel", b"not a kernel");
    std::fs::set_permissions(&k, std::fs::Permissions::from_mode(0o644)).unwrap();
    let image = |name: &str, mode: u32| {
        let p = temp_file(name, &[0u8; 4096]);
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    };
    let read_only = image("perm-r", 0o444);
    let none = image("perm-none", 0o000);
    for (disk, needle) in [
        (format!("path={read_only}"), "Permission denied"),
        (format!("path={none}"), "Permission denied"),
        (format!("path={none},readonly=on"), "Permission denied"),
    ] {
        let args = ["--kernel", k.as_str(), "--disk", disk.as_str()];
        let out = run_unprivileged(&args);
        assert_one_line_error_of(out.clone(), &args, needle);
        assert_one_line_error_of(out, &args, "--disk");
    }
    // Opened: what stops this VMM comes after the disks (its kernel, or /dev/kvm for nobody).
    let disk = format!("path={read_only},readonly=on");
    let (code, err) = run_unprivileged(&["--kernel", &k, "--disk", &disk]);
    assert!(code != 0 && !err.contains("perm-r"), "{err}");
    for p in [k, read_only, none] {
        let _ = std::fs::remove_file(p);
    }
}
