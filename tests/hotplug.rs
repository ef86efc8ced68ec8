//! Native PCIe hot-plug on real guests (issue 4, SPEC.md §5–§6), driven through the control
//! socket: a card present before the guest's pciehp binds, hot-add, graceful removal through the
//! attention button, the guest-is-busy refusal, a removal followed at once by an add into the same
//! slot and an add followed at once by a removal, every root port, and bad input (50 cycles that
//! must leak nothing are in tests/cycles.rs).
//!
//! The guest is the evidence: its block-device reports, /sys/block, the data it reads, and the
//! lines pciehp logs.

use crate::common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::hotplug::*;
use common::qmp::QmpClient;
use common::{BootOptions, Guest, TempDir, BOOT_TIMEOUT, READY_MARKER};
use serde_json::{json, Value};

fn native_hotplug(version: &str) {
    let dir = TempDir::new(&format!("hotplug-{version}"));
    let disks: Vec<(String, PathBuf)> = [
        "cold", "early", "a", "b", "c", "d0", "d1", "d2", "d3", "q", "x",
    ]
    .iter()
    .map(|n| (n.to_string(), make_disk(&dir, n)))
    .collect();
    let disk = |n: &str| disks.iter().find(|(d, _)| d == n).unwrap().1.clone();
    let sock = dir.path("qmp.sock");
    let mut opts = BootOptions::new(version).qmp(&sock);
    opts.extra_args.extend([
        "--disk".to_string(),
        format!("path={},id=cold,bus=rp0", disk("cold").display()),
    ]);
    let mut g = Guest::start(&opts);
    let mut q = QmpClient::negotiated(&sock);

    // A card inserted before the guest's pciehp has bound (the kernel is not even running yet).
    blockdev_add(&mut q, "early", &disk("early"));
    q.ok(
        "device_add",
        json!({"driver": "virtio-blk-pci", "id": "early", "drive": "early", "bus": "rp3", "addr": "0"}),
    );
    g.wait_for_line(|l| l.starts_with(READY_MARKER), BOOT_TIMEOUT);

    let mut present = guest_disks(&mut g);
    present.sort_by(|a, b| a.1.cmp(&b.1));
    let serials: Vec<&str> = present.iter().map(|(_, s)| s.as_str()).collect();
    assert_eq!(serials, ["cold", "early"], "{present:?}");
    for (dev, serial) in present.clone() {
        check_disk(&mut g, &dev, &serial, &serial);
    }
    let slots = q.ok("x-query-hotplug", json!({}));
    for (bus, occupant) in [("rp0", "cold"), ("rp3", "early")] {
        let s = slot(&slots, bus);
        assert_eq!(s["occupant"], occupant, "{s}");
        assert_eq!(s["presence"], true, "{s}");
        assert_eq!(s["power"], true, "{s}");
        assert_eq!(s["armed"], true, "pciehp armed {bus}: {s}");
    }
    let pci = q.ok("query-pci", json!({}));
    let rp3 = pci[0]["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["qdev_id"] == "rp3")
        .unwrap_or_else(|| panic!("rp3 in {pci}"));
    assert_eq!(rp3["pci_bridge"]["devices"][0]["qdev_id"], "early", "{rp3}");

    // ---- Bad input: an error each, nothing changes, the guest and the socket go on. ----
    blockdev_add(&mut q, "x", &disk("x"));
    let before = q.ok("x-query-hotplug", json!({}));
    let missing = dir.path("no-such-file.img");
    let bad: Vec<(&str, Value, &str)> = vec![
        (
            "device_add",
            json!({"driver": "virtio-blk-pci", "id": "z", "bus": "rp1"}),
            "drive",
        ),
        (
            "device_add",
            json!({"driver": "virtio-blk-pci", "id": 42, "drive": "x", "bus": "rp1"}),
            "id",
        ),
        (
            "device_add",
            json!({"driver": "e1000", "id": "z", "drive": "x", "bus": "rp1"}),
            "e1000",
        ),
        (
            "device_add",
            json!({"driver": "virtio-blk-pci", "id": "z", "drive": "nope", "bus": "rp1"}),
            "nope",
        ),
        (
            "device_add",
            json!({"driver": "virtio-blk-pci", "id": "z", "drive": "x", "bus": "rp9"}),
            "rp9",
        ),
        (
            "device_add",
            json!({"driver": "virtio-blk-pci", "id": "z", "drive": "x", "bus": "pcie.0", "addr": "10"}),
            "not a hot-plug slot",
        ),
        (
            "device_add",
            json!({"driver": "virtio-blk-pci", "id": "cold", "drive": "x", "bus": "rp1"}),
            "Duplicate",
        ),
        (
            "device_add",
            json!({"driver": "virtio-blk-pci", "id": "z", "drive": "early", "bus": "rp1"}),
            "in use",
        ),
        (
            "device_add",
            json!({"driver": "virtio-blk-pci", "id": "z", "drive": "x", "bus": "rp0"}),
            "occupied",
        ),
        (
            "device_add",
            json!({"driver": "virtio-blk-pci", "id": "z", "drive": "x", "bus": "rp1", "addr": "3"}),
            "addr",
        ),
        (
            "device_add",
            json!({"driver": "virtio-blk-pci", "id": "z", "drive": "x", "bus": "rp1", "bogus": 1}),
            "bogus",
        ),
        (
            "blockdev-add",
            json!({"driver": "file", "node-name": "m", "filename": missing.display().to_string()}),
            "Could not open",
        ),
        (
            "blockdev-add",
            json!({"driver": "raw", "node-name": "early", "file": {"driver": "file", "filename": disk("a").display().to_string()}}),
            "Duplicate",
        ),
        (
            "blockdev-add",
            json!({"driver": "file", "node-name": "m", "filename": disk("a").display().to_string(), "read-only": "yes"}),
            "read-only",
        ),
        (
            "blockdev-add",
            json!({"driver": "file", "filename": disk("a").display().to_string()}),
            "node-name",
        ),
        (
            "blockdev-add",
            json!({"driver": "qcow2", "node-name": "m", "filename": disk("a").display().to_string()}),
            "qcow2",
        ),
        ("blockdev-del", json!({"node-name": "nope"}), "nope"),
        ("blockdev-del", json!({"node-name": "early"}), "busy"),
        ("device_del", json!({"id": "nope"}), "not found"),
        ("device_del", json!({}), "id"),
        ("device_del", json!({"id": ["early"]}), "id"),
    ];
    for (cmd, args, needle) in bad {
        let desc = q.err(cmd, args.clone());
        assert!(
            desc.contains(needle),
            "{cmd} {args}: {desc:?} lacks {needle:?}"
        );
    }
    let r = q.send_raw("{\"execute\": \"device_add\", \"arguments\": {]}\n");
    assert!(r.get("error").is_some(), "{r}");
    assert_eq!(
        q.ok("x-query-hotplug", json!({})),
        before,
        "bad input changed the slots"
    );
    assert_eq!(g.run("echo alive"), "alive");
    // And a second client at the same time sees the same.
    let mut q2 = QmpClient::negotiated(&sock);
    assert_eq!(q2.ok("x-query-hotplug", json!({})), before);

    // ---- Hot-add into rp1; the backend is busy while the device exists. ----
    blockdev_add(&mut q, "a", &disk("a"));
    let dev_a = hot_add(&mut g, &mut q, "a", "a", "rp1");
    assert!(q
        .err("blockdev-del", json!({"node-name": "a"}))
        .contains("busy"));
    let block = q.ok("query-block", json!({}));
    assert!(
        block.as_array().unwrap().iter().any(|b| b["qdev"] == "a"),
        "{block}"
    );

    // ---- Graceful removal: the button, the guest's grace period, then DEVICE_DELETED. ----
    // Forget the slot events of the hot-add (the reply to a query comes after them).
    q.ok("x-query-hotplug", json!({}));
    q.events.clear();
    q.ok("device_del", json!({"id": "a"}));
    let again = q.err("device_del", json!({"id": "a"}));
    assert!(again.contains("already requested"), "{again}");
    // Once the guest blinks the power indicator (its 5 s grace period), a removal is refused.
    q.wait_event_where(
        |e| {
            e["event"] == "X_HOTPLUG_SLOT"
                && e["data"]["bus"] == "rp1"
                && e["data"]["change"] == "power-indicator"
                && e["data"]["value"] == "blinking"
        },
        Duration::from_secs(30),
    )
    .unwrap_or_else(|| g.fail("the guest did not blink rp1's power indicator"));
    let busy = q.err("device_del", json!({"id": "a"}));
    assert!(busy.contains("guest is busy"), "{busy}");
    // The other client hears of it too.
    let deleted = wait_deleted(&g, &mut q, "a");
    assert_eq!(deleted["data"]["path"], "/machine/peripheral/a");
    assert!(q2
        .wait_event("DEVICE_DELETED", Some("a"), Duration::from_secs(10))
        .is_some());
    // The slot's power-off came before the device went.
    let order: Vec<String> = q
        .all_events
        .iter()
        .filter(|e| {
            e["event"] == "DEVICE_DELETED" && e["data"]["device"] == "a"
                || e["event"] == "X_HOTPLUG_SLOT"
                    && e["data"]["bus"] == "rp1"
                    && e["data"]["change"] == "power"
                    && e["data"]["value"] == "off"
        })
        .map(|e| e["event"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(order, ["X_HOTPLUG_SLOT", "DEVICE_DELETED"]);
    g.wait_for_line(
        |l| block_event(l, "BLOCK-REMOVE").as_deref() == Some(dev_a.as_str()),
        ADD_TIMEOUT,
    );
    assert!(!guest_disks(&mut g).iter().any(|(_, s)| s == "a"));
    q.ok("blockdev-del", json!({"node-name": "a"}));
    let desc = q.err("device_del", json!({"id": "a"}));
    assert!(desc.contains("not found"), "removing twice: {desc}");

    // ---- A removal followed at once by an add into the same slot. ----
    blockdev_add(&mut q, "b", &disk("b"));
    blockdev_add(&mut q, "c", &disk("c"));
    hot_add(&mut g, &mut q, "b", "b", "rp1");
    q.ok("device_del", json!({"id": "b"}));
    let occupied = q.err(
        "device_add",
        json!({"driver": "virtio-blk-pci", "id": "c", "drive": "c", "bus": "rp1"}),
    );
    assert!(occupied.contains("occupied"), "{occupied}");
    wait_deleted(&g, &mut q, "b");
    hot_add(&mut g, &mut q, "c", "c", "rp1");

    // ---- An add followed at once by a removal: the guest is still enabling the slot when the
    // button is pressed; the removal still completes. ----
    blockdev_add(&mut q, "a", &disk("a"));
    q.ok(
        "device_add",
        json!({"driver": "virtio-blk-pci", "id": "a", "drive": "a", "bus": "rp2"}),
    );
    q.ok("device_del", json!({"id": "a"}));
    wait_deleted(&g, &mut q, "a");
    let slots = q.ok("x-query-hotplug", json!({}));
    let rp2 = slot(&slots, "rp2");
    assert_eq!(rp2["occupant"], Value::Null, "{rp2}");
    assert_eq!(rp2["presence"], false, "{rp2}");
    assert_eq!(rp2["power"], false, "{rp2}");
    assert_eq!(rp2["pending"], Value::Null, "{rp2}");
    // Let the guest settle (it may have probed the card before letting it go).
    std::thread::sleep(Duration::from_secs(2));
    assert!(!guest_disks(&mut g).iter().any(|(_, s)| s == "a"));

    // ---- Remove the cold-plugged card and the early one; then hot-add into every port. ----
    q.ok("device_del", json!({"id": "cold"}));
    q.ok("device_del", json!({"id": "early"}));
    q.ok("device_del", json!({"id": "c"}));
    for id in ["cold", "early", "c"] {
        wait_deleted(&g, &mut q, id);
    }
    for n in 0..4 {
        let id = format!("d{n}");
        blockdev_add(&mut q, &id, &disk(&id));
        hot_add(&mut g, &mut q, &id, &id, &format!("rp{n}"));
    }
    for n in 0..4 {
        q.ok("device_del", json!({"id": format!("d{n}")}));
    }
    for n in 0..4 {
        wait_deleted(&g, &mut q, &format!("d{n}"));
    }
    assert!(guest_disks(&mut g).is_empty());

    // ---- QEMU's own tools, unchanged: qmp-shell hot-adds a disk, qemu.qmp removes it. ----
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../resources/qmp_hotplug.py");
    let python = std::env::var("HOTPLUG_VMM_PYTHON").unwrap_or_else(|_| "python3".into());
    let qemu_qmp = |args: &[&str]| {
        let out = std::process::Command::new(&python)
            .arg(&script)
            .arg(&sock)
            .args(args)
            .output()
            .expect("run python3");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "qmp_hotplug.py {args:?}: {text}");
        text
    };
    // What a user types into qmp-shell.
    let shell_input = format!(
        "blockdev-add driver=raw node-name=q file={{\"driver\":\"file\",\"filename\":\"{}\"}}\n\
         device_add driver=virtio-blk-pci id=q drive=q bus=rp2\n",
        disk("q").display()
    );
    let mut shell = std::process::Command::new(&python)
        .args(["-m", "qemu.qmp.qmp_shell"])
        .arg(&sock)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run qmp-shell");
    {
        use std::io::Write;
        let mut stdin = shell.stdin.take().unwrap();
        stdin.write_all(shell_input.as_bytes()).unwrap();
    }
    let out = shell.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        text.matches("{\"return\": {}}").count(),
        2,
        "qmp-shell: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = g.wait_for_line(|l| block_event(l, "BLOCK-ADD").is_some(), ADD_TIMEOUT);
    check_disk(&mut g, &block_event(&line, "BLOCK-ADD").unwrap(), "q", "q");
    let out = qemu_qmp(&["del", "q"]);
    assert!(out.contains("DEVICE_DELETED"), "{out}");
    assert!(!guest_disks(&mut g).iter().any(|(_, s)| s == "q"));

    q.ok("blockdev-del", json!({"node-name": "x"}));

    // ---- What pciehp said. ----
    let dmesg = g.run("dmesg | grep -E 'pciehp|virtio_blk' | sed 's/^/K: /'");
    eprintln!("{version}: pciehp/virtio_blk lines:\n{dmesg}");
    // 6.1 says "Attention button pressed" and "Powering off due to button press"; 6.12 says
    // "Button press: will power off in 5 sec".
    let button = |slot: u8| {
        dmesg.contains(&format!("Slot({slot}): Powering off due to button press"))
            || dmesg.contains(&format!(
                "Slot({slot}): Button press: will power off in 5 sec"
            ))
    };
    for n in 0..4 {
        assert!(
            button(n),
            "dmesg lacks pciehp's button handling on slot {n}"
        );
        for needle in [
            format!("Slot({n}): Card present"),
            format!("Slot({n}): Link Up"),
        ] {
            assert!(dmesg.contains(&needle), "dmesg lacks {needle:?}");
        }
    }
    for bad in [
        "Timeout",
        "BUG",
        "Oops",
        "cannot hot-add",
        "Failed to check link status",
    ] {
        assert!(!dmesg.contains(bad), "dmesg has {bad:?}");
    }
    let stderr = g.stderr_text();
    assert!(!stderr.contains("panicked"), "{stderr}");
    let status = g.poweroff();
    assert_eq!(status.code(), Some(0));
}

#[test]
fn native_hotplug_linux_6_1() {
    native_hotplug("6.1");
}

#[test]
fn native_hotplug_linux_6_12() {
    native_hotplug("6.12");
}
