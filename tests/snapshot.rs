//! Snapshots and migrations that carry an unfinished hot-plug (issue 19), on real guests.
//!
//! Each kernel's guest is restored from the suite's shared boot (`Guest::restore`), so what is
//! saved here is itself a restored VM. The guest writes to a disk hot-added to a native slot;
//! disks are hot-added to another native slot, the root bus (ACPI) and the ACPI root port;
//! then, at once, a `device_del` of the first (the guest blinking its 5 s), a `device_del` of
//! the root bus's (an eject request), a `device_add` to a third native slot (the guest enabling
//! it) and a surprise removal (policy `fail`) of the last; the VM is stopped and saved to a
//! file. The saved state is checked there and then: the press, the eject request, the pulled
//! device still failing.
//!
//! A second VMM restores the file (paused, as the source was when it was saved), and after
//! `cont`: the removals complete with `DEVICE_DELETED` from the restored VMM (the source sent
//! none), each node's backend can be deleted only then, the hot-added disk comes up and reads
//! its data, the pulled device fails until its driver resets it, a `blockdev-del` refused before
//! is refused after, and the data written before reads back.
//!
//! Then a live migration over `unix:` in the middle of another removal: the destination ends
//! it, exactly once, and the source, stopped in `postmigrate`, never does. Last, on the
//! destination, a slow migration (`exec:` into a reader that waits) during which the hot-plug
//! commands and a second `migrate` are refused, and after which `cont` runs the VM again.

use crate::common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::hotplug::*;
use common::migration::*;
use common::qmp::QmpClient;
use common::surprise::*;
use common::{BootOptions, Guest, TempDir};
use serde_json::{json, Value};

/// DEVICE_DELETED events for `id` a client has seen.
fn deleted_events(q: &QmpClient, id: &str) -> usize {
    q.all_events
        .iter()
        .filter(|e| e["event"] == "DEVICE_DELETED" && e["data"]["device"] == id)
        .count()
}

/// Options for a VMM that takes its guest from `uri` (the kernel options are ignored then).
fn incoming(opts: &BootOptions, uri: &str) -> BootOptions {
    let mut o = opts.clone();
    o.extra_args
        .extend(["--incoming".to_string(), uri.to_string()]);
    o
}

fn snapshot_hotplug(version: &str) {
    let dir = TempDir::new(&format!("snapshot-{version}"));
    let sock = dir.path("qmp.sock");
    let opts = BootOptions::shared(version).qmp(&sock);
    let mut g = Guest::restore(&opts);
    let mut q = QmpClient::negotiated(&sock);

    // ---- Before the snapshot ----
    blockdev_add(&mut q, "data", &make_disk(&dir, "data"));
    let data_dev = hot_add(&mut g, &mut q, "data", "data", "rp0");
    g.run(&format!(
        "printf written-before-the-snapshot | dd of=/dev/{data_dev} bs=512 seek=100 conv=fsync 2>/dev/null"
    ));
    for (id, bus) in [("gone", "rp1"), ("eject", "pcie.0"), ("pulled", "rp3")] {
        blockdev_add(&mut q, id, &make_disk(&dir, id));
        hot_add(&mut g, &mut q, id, id, bus);
    }
    // A removal the guest is answering: pressed, and the guest blinks its 5 s.
    q.ok("device_del", json!({"id": "gone"}));
    let blinking = q.wait_event_where(
        |e| {
            e["event"] == "X_HOTPLUG_SLOT"
                && e["data"]["bus"] == "rp1"
                && e["data"]["change"] == "power-indicator"
                && e["data"]["value"] == "blinking"
        },
        DEL_TIMEOUT,
    );
    assert!(blinking.is_some(), "rp1 never blinked");
    // An eject request acpiphp has not answered; a card the guest has not enabled yet; a
    // device pulled out that fails its driver's requests until the driver resets it.
    q.ok("device_del", json!({"id": "eject"}));
    blockdev_add(&mut q, "late", &make_disk(&dir, "late"));
    q.ok(
        "device_add",
        json!({"driver": "virtio-blk-pci", "id": "late", "drive": "late", "bus": "rp2"}),
    );
    pull(&g, &mut q, "pulled", Some("fail"), Some("zero"));
    q.ok("stop", json!({}));
    assert!(q
        .wait_event("STOP", None, Duration::from_secs(10))
        .is_some());
    assert_eq!(status(&mut q), "paused");
    let refused_before = q.err("blockdev-del", json!({"node-name": "late"}));

    // What is about to be saved: the press, the eject request, the pulled device.
    let before = q.ok("x-query-hotplug", json!({}));
    assert_eq!(slot(&before, "rp1")["pending"]["presses"], 1, "{before}");
    let pulled_ids: Vec<&Value> = before["pulled"].as_array().unwrap().iter().collect();
    assert!(
        pulled_ids.iter().any(|p| p["id"] == "pulled"),
        "the pulled device is still failing at the snapshot: {before}"
    );
    let snap = dir.path("snap");
    migrate(&mut q, &format!("file:{}", snap.display()));
    wait_migration(&mut q, "completed");
    assert_eq!(status(&mut q), "postmigrate");
    assert_eq!(deleted_events(&q, "gone") + deleted_events(&q, "eject"), 0);
    q.ok("quit", json!({}));
    g.wait_exit(Duration::from_secs(30));
    assert_eq!(
        deleted_events(&q, "gone") + deleted_events(&q, "eject"),
        0,
        "the source ended no removal"
    );

    // ---- Restored ----
    let restore_opts = incoming(&opts, &format!("file:{}", snap.display()));
    let started = Instant::now();
    let mut g = Guest::start(&restore_opts);
    let mut q = QmpClient::negotiated(&sock);
    eprintln!(
        "{version}: restored, control socket up after {:.2}s",
        started.elapsed().as_secs_f64()
    );

    // Saved stopped, restored stopped.
    assert_eq!(status_after_incoming(&mut q), "paused");
    let after = q.ok("x-query-hotplug", json!({}));
    // The press (with its age, the clock stood still), the pulled device, the _OSC report.
    assert_eq!(
        slot(&after, "rp1")["pending"],
        slot(&before, "rp1")["pending"]
    );
    assert_eq!(after["pulled"], before["pulled"], "{after}");
    assert_eq!(after["osc"], before["osc"]);
    assert_eq!(
        q.err("blockdev-del", json!({"node-name": "late"})),
        refused_before,
        "a blockdev-del refused before is refused after"
    );
    // The node of a device not removed yet cannot go.
    q.err("blockdev-del", json!({"node-name": "gone"}));
    q.ok("cont", json!({}));
    assert!(q
        .wait_event("RESUME", None, Duration::from_secs(10))
        .is_some());

    // The removals end on the restored VMM, each once, and only then do their nodes go.
    for id in ["gone", "eject"] {
        wait_deleted(&g, &mut q, id);
        q.ok("blockdev-del", json!({"node-name": id}));
    }
    // The card inserted before the snapshot comes up.
    let line = g.wait_for_line(|l| block_event(l, "BLOCK-ADD").is_some(), ADD_TIMEOUT);
    let late_dev = block_event(&line, "BLOCK-ADD").unwrap();
    check_disk(&mut g, &late_dev, "late", "late");
    // The pulled device's driver resets it; then it is let go.
    wait_pulled_released(&g, &mut q, DEL_TIMEOUT);
    // The data written before the snapshot.
    let back = g.run(&format!(
        "dd if=/dev/{data_dev} bs=512 skip=100 count=1 2>/dev/null | head -c 27"
    ));
    assert_eq!(back.trim(), "written-before-the-snapshot");
    let mut present = guest_disks(&mut g);
    present.sort_by(|a, b| a.1.cmp(&b.1));
    let serials: Vec<&str> = present.iter().map(|(_, s)| s.as_str()).collect();
    assert_eq!(serials, ["data", "late"], "{present:?}");
    assert_eq!(deleted_events(&q, "gone"), 1);
    assert_eq!(deleted_events(&q, "eject"), 1);

    // ---- A live migration in the middle of a removal ----
    blockdev_add(&mut q, "mig", &make_disk(&dir, "mig"));
    hot_add(&mut g, &mut q, "mig", "mig", "rp1");
    q.ok("device_del", json!({"id": "mig"}));
    let sock2 = dir.path("qmp2.sock");
    let msock = dir.path("migrate.sock");
    let mut dest_opts = incoming(&opts, &format!("unix:{}", msock.display()));
    dest_opts
        .extra_args
        .retain(|a| a != &sock.display().to_string());
    let at = dest_opts
        .extra_args
        .iter()
        .position(|a| a == "--qmp")
        .unwrap();
    dest_opts
        .extra_args
        .insert(at + 1, sock2.display().to_string());
    let mut d = Guest::start(&dest_opts);
    let mut q2 = QmpClient::negotiated(&sock2);
    assert_eq!(status(&mut q2), "inmigrate");
    while !msock.exists() {
        std::thread::sleep(Duration::from_millis(20));
    }
    migrate(&mut q, &format!("unix:{}", msock.display()));
    wait_migration(&mut q, "completed");
    let info = q.ok("query-migrate", json!({}));
    eprintln!("{version}: live migration: {info}");
    assert!(info["downtime"].as_u64().is_some(), "{info}");
    assert_eq!(status(&mut q), "postmigrate");
    q.wait_event_where(
        |e| e["event"] == "MIGRATION" && e["data"]["status"] == "completed",
        Duration::from_secs(1),
    );
    // The destination runs (the source ran) and ends the removal.
    wait_deleted(&d, &mut q2, "mig");
    q2.ok("blockdev-del", json!({"node-name": "mig"}));
    assert_eq!(status_after_incoming(&mut q2), "running");
    std::thread::sleep(Duration::from_secs(1));
    q.ok("query-status", json!({}));
    assert_eq!(
        deleted_events(&q, "mig"),
        0,
        "the source, stopped, ended no removal"
    );
    assert_eq!(deleted_events(&q2, "mig"), 1);
    q.ok("quit", json!({}));
    g.wait_exit(Duration::from_secs(30));
    let back = d.run(&format!(
        "dd if=/dev/{data_dev} bs=512 skip=100 count=1 2>/dev/null | head -c 27"
    ));
    assert_eq!(back.trim(), "written-before-the-snapshot");

    // ---- Refused while a migration runs ----
    blockdev_add(&mut q2, "busy", &make_disk(&dir, "busy"));
    let slow = dir.path("slow");
    migrate(&mut q2, &format!("exec:sleep 2; cat > {}", slow.display()));
    for (command, args) in [
        (
            "device_add",
            json!({"driver": "virtio-blk-pci", "id": "busy", "drive": "busy", "bus": "rp1"}),
        ),
        ("device_del", json!({"id": "late"})),
        ("x-surprise-remove", json!({"id": "late"})),
        ("blockdev-del", json!({"node-name": "busy"})),
    ] {
        let e = q2.err(command, args);
        assert!(e.contains("while a migration is running"), "{command}: {e}");
    }
    let e = q2.err("migrate", json!({"uri": "file:/dev/null"}));
    assert!(e.contains("migration process in progress"), "{e}");
    wait_migration(&mut q2, "completed");
    assert_eq!(status(&mut q2), "postmigrate");
    q2.ok("cont", json!({}));
    assert_eq!(status(&mut q2), "running");
    let out = d.run("echo still-here");
    assert_eq!(out.trim(), "still-here");
    assert!(d.poweroff().success());
}

#[test]
fn snapshot_hotplug_linux_6_1() {
    snapshot_hotplug("6.1");
}

#[test]
fn snapshot_hotplug_linux_6_12() {
    snapshot_hotplug("6.12");
}

// ---- Refusals: no guest needs to run ----

/// A VMM process killed if the test ends without waiting for it.
struct Vmm(std::process::Child);

impl Vmm {
    fn spawn(args: &[String]) -> Vmm {
        Vmm(Command::new(common::vmm_binary())
            .args(args)
            .spawn()
            .unwrap())
    }

    fn wait(mut self) -> std::process::ExitStatus {
        self.0.wait().unwrap()
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Runs the VMM with `args`; returns its exit status and stderr.
fn vmm(args: &[String]) -> (i32, String) {
    let out = Command::new(common::vmm_binary())
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A machine that never ran (`-S`), saved to `snap`: its disk on rp0 is `disk`.
fn saved_paused_machine(dir: &TempDir, disk: &Path, snap: &Path) -> Vec<String> {
    let sock = dir.path("src.sock");
    let machine = vec![
        "--kernel".to_string(),
        common::vmlinux("6.1").display().to_string(),
        "--memory".to_string(),
        "128M".to_string(),
        "--serial".to_string(),
        "null".to_string(),
        "--disk".to_string(),
        format!("path={},id=d,bus=rp0", disk.display()),
    ];
    let mut args = machine.clone();
    args.extend([
        "-S".to_string(),
        "--qmp".to_string(),
        sock.display().to_string(),
    ]);
    let mut child = Command::new(common::vmm_binary())
        .args(&args)
        .spawn()
        .unwrap();
    let mut q = QmpClient::negotiated(&sock);
    assert_eq!(status(&mut q), "paused");
    migrate(&mut q, &format!("file:{}", snap.display()));
    wait_migration(&mut q, "completed");
    q.ok("quit", json!({}));
    child.wait().unwrap();
    machine
}

/// Restoring `snap` with `machine` plus `extra` fails with one line holding `needle`.
fn refused(machine: &[String], snap: &str, extra: &[&str], needle: &str) {
    let mut args = machine.to_vec();
    args.extend(["--incoming".to_string(), snap.to_string()]);
    args.extend(extra.iter().map(|s| s.to_string()));
    let (code, err) = vmm(&args);
    assert_eq!(code, 1, "{extra:?}: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line: {err}");
    assert!(lines[0].contains(needle), "{extra:?}: {err} lacks {needle}");
}

#[test]
fn snapshots_that_do_not_fit_are_refused_with_the_reason() {
    let dir = TempDir::new("snapshot-refusals");
    let disk = make_disk(&dir, "d");
    let snap = dir.path("snap");
    let machine = saved_paused_machine(&dir, &disk, &snap);
    let file = format!("file:{}", snap.display());

    // A machine of another shape, each named with its option.
    let mut other = machine.clone();
    let at = other.iter().position(|a| a == "128M").unwrap();
    other[at] = "256M".into();
    refused(&other, &file, &[], "(--memory)");
    for (extra, needle) in [
        (&["--cpus", "2"][..], "(--cpus)"),
        (&["--root-ports", "3"][..], "--root-ports"),
        (&["--root-port-hotplug", "rp2=acpi"][..], "rp2=acpi"),
        (
            &["--osc-native-hotplug", "deny"][..],
            "(--osc-native-hotplug)",
        ),
        (&["--no-command-completed"][..], "(--no-command-completed)"),
    ] {
        refused(&machine, &file, extra, needle);
    }
    let mut other_disk = machine.clone();
    let at = other_disk
        .iter()
        .position(|a| a.starts_with("path="))
        .unwrap();
    other_disk[at].push_str(",readonly=on");
    refused(&other_disk, &file, &[], "--disk");

    // The backing file: missing, resized, replaced by another file under its name.
    let moved = dir.path("moved.img");
    std::fs::rename(&disk, &moved).unwrap();
    refused(&machine, &file, &[], "is missing");
    std::fs::rename(&moved, &disk).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
    let len = f.metadata().unwrap().len();
    f.set_len(len + 512).unwrap();
    refused(&machine, &file, &[], "was resized");
    f.set_len(len).unwrap();
    std::fs::copy(&disk, &moved).unwrap();
    let original = dir.path("original.img");
    std::fs::rename(&disk, &original).unwrap();
    std::fs::rename(&moved, &disk).unwrap();
    refused(&machine, &file, &[], "was replaced");
    std::fs::rename(&original, &disk).unwrap();

    // The snapshot: truncated, corrupted, of another format version, not a snapshot.
    let bytes = std::fs::read(&snap).unwrap();
    let bad = dir.path("bad");
    let write_bad = |b: &[u8]| std::fs::write(&bad, b).unwrap();
    let bad_uri = format!("file:{}", bad.display());
    write_bad(&bytes[..100]);
    refused(&machine, &bad_uri, &[], "truncated");
    let mut corrupt = bytes.clone();
    corrupt[60] ^= 1;
    write_bad(&corrupt);
    refused(&machine, &bad_uri, &[], "corrupted");
    let mut old = bytes.clone();
    old[8..12].copy_from_slice(&0u32.to_le_bytes());
    write_bad(&old);
    refused(
        &machine,
        &bad_uri,
        &[],
        "snapshot format version 0 is not supported (this hotplug-vmm reads version 1)",
    );
    write_bad(b"not a snapshot at all");
    refused(&machine, &bad_uri, &[], "not a hotplug-vmm snapshot");
    // A memory image needs file: (it is mapped), not a pipe.
    refused(
        &machine,
        &format!("exec:cat {}", snap.display()),
        &[],
        "can only be read from a file",
    );
    refused(
        &machine,
        "tcp:1.2.3.4:5",
        &[],
        "unix:PATH, exec:COMMAND or file:PATH",
    );

    // The good one restores, paused as it was saved, with its disk.
    let sock = dir.path("dst.sock");
    let mut args = machine.clone();
    args.extend([
        "--incoming".to_string(),
        file.clone(),
        "--qmp".to_string(),
        sock.display().to_string(),
    ]);
    let child = Vmm::spawn(&args);
    let mut q = QmpClient::negotiated(&sock);
    assert_eq!(status_after_incoming(&mut q), "paused");
    let block = q.ok("query-block", json!({}));
    assert_eq!(block[0]["qdev"], "d", "{block}");
    q.ok("quit", json!({}));
    assert!(child.wait().success());
}

#[test]
fn a_destination_unlike_the_source_is_refused_before_memory_moves() {
    let dir = TempDir::new("migrate-refused");
    let disk = make_disk(&dir, "d");
    let snap = dir.path("unused");
    let machine = saved_paused_machine(&dir, &disk, &snap);
    let msock = dir.path("m.sock");
    let mut dest = machine.clone();
    dest.extend([
        "--cpus".to_string(),
        "2".to_string(),
        "--incoming".to_string(),
        format!("unix:{}", msock.display()),
    ]);
    let dest_child = std::thread::spawn(move || vmm(&dest));
    let sock = dir.path("src2.sock");
    let mut src = machine.clone();
    src.extend([
        "-S".to_string(),
        "--qmp".to_string(),
        sock.display().to_string(),
    ]);
    let child = Vmm::spawn(&src);
    let mut q = QmpClient::negotiated(&sock);
    while !msock.exists() {
        std::thread::sleep(Duration::from_millis(20));
    }
    migrate(&mut q, &format!("unix:{}", msock.display()));
    wait_migration(&mut q, "failed");
    let info = q.ok("query-migrate", json!({}));
    let why = info["error-desc"].as_str().unwrap_or_default();
    assert!(
        why.contains("refused") && why.contains("(--cpus)"),
        "{info}"
    );
    assert_eq!(info["ram"]["normal"], 0, "no memory moved: {info}");
    // The source is as it was: paused, and it can migrate again.
    assert_eq!(status(&mut q), "paused");
    let (code, err) = dest_child.join().unwrap();
    assert_eq!(code, 1);
    assert!(err.contains("(--cpus)"), "{err}");
    q.ok("quit", json!({}));
    child.wait();
}
