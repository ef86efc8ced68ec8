//! The host side of a vanished disk (issue 6): a disk whose backing file starts failing, the
//! way a network block device does when its server dies. The image is served over FUSE by
//! `resources/fuse-disk.py`; killing that daemon makes every access to the open file fail with
//! ENOTCONN.
//!
//! By default (`--backend-error report`) the guest gets I/O errors and nothing worse, the VMM
//! reports `X_BACKEND_ERROR` and stays up, and the disk can still be removed gracefully. With
//! `x-backend-error: surprise-remove` on the device (or `--backend-error surprise-remove`) the
//! failing disk is pulled out of the guest instead, its readers failed rather than stranded.
//!
//! Last, on this guest's native slot, what the `drop` in-flight policy does to Linux 6.1 (see
//! `common::surprise::pin_drop_hang`; tests/osc.rs pins it on 6.12 through acpiphp).

use crate::common;

use std::time::Duration;

use common::fuse::FuseDisk;
use common::hotplug::*;
use common::qmp::QmpClient;
use common::surprise::pin_drop_hang;
use common::{BootOptions, Guest, TempDir};
use serde_json::json;

fn backend_failure(version: &str) {
    let dir = TempDir::new(&format!("backend-{version}"));
    let sock = dir.path("qmp.sock");
    let mut opts = BootOptions::shared(version).qmp(&sock);
    // (BARs reading zero after the pull let the guest's virtio-pci finish the removal and the
    // guest power off: see tests/surprise.rs.)
    opts.extra_args
        .extend(["--surprise-bar-reads".to_string(), "zero".to_string()]);
    let mut g = Guest::restore(&opts);
    let mut q = QmpClient::negotiated(&sock);

    // ---- Default: the guest gets I/O errors, the VMM reports and stays up. ----
    let mut a = FuseDisk::start(&dir, "fa");
    blockdev_add(&mut q, "fa", &a.file());
    let dev = hot_add(&mut g, &mut q, "fa-d", "fa", "rp0");
    a.kill();
    let read = format!("dd if=/dev/{dev} of=/dev/null bs=4k count=4 skip=512 iflag=direct");
    for _ in 0..2 {
        let (out, status) = g.run_status(&read, Duration::from_secs(60));
        assert_ne!(status, 0, "a read of the dead backend fails: {out}");
        assert!(
            out.contains("I/O error") || out.contains("Input/output error"),
            "{out}"
        );
    }
    let event = q
        .wait_event("X_BACKEND_ERROR", Some("fa-d"), Duration::from_secs(10))
        .unwrap_or_else(|| g.fail("no X_BACKEND_ERROR for fa-d"));
    assert_eq!(event["data"]["action"], "report", "{event}");
    assert_eq!(event["data"]["operation"], "read", "{event}");
    let error = event["data"]["error"].as_str().unwrap();
    assert!(error.contains("not connected"), "{event}");
    q.ok("query-status", json!({}));
    let slots = q.ok("x-query-hotplug", json!({}));
    assert_eq!(slot(&slots, "rp0")["occupant"], "fa-d", "{slots}");
    assert_eq!(g.run("echo alive"), "alive");
    // Reported once per disk, however many requests fail.
    assert_eq!(
        q.all_events
            .iter()
            .filter(|e| e["event"] == "X_BACKEND_ERROR")
            .count(),
        1
    );
    // The disk can still be removed gracefully (the guest's driver resets it; no I/O needed).
    q.ok("device_del", json!({"id": "fa-d"}));
    wait_deleted(&g, &mut q, "fa-d");
    wait_block_removed(&mut g, &dev);
    q.ok("blockdev-del", json!({"node-name": "fa"}));

    // ---- x-backend-error: surprise-remove: the failing disk is pulled out of the guest. ----
    let e = q.err(
        "device_add",
        json!({"driver": "virtio-blk-pci", "id": "z", "drive": "fa", "bus": "rp1",
               "x-backend-error": "explode"}),
    );
    assert!(e.contains("x-backend-error"), "{e}");
    let mut b = FuseDisk::start(&dir, "fb");
    blockdev_add(&mut q, "fb", &b.file());
    q.ok(
        "device_add",
        json!({"driver": "virtio-blk-pci", "id": "fb-d", "drive": "fb", "bus": "rp1",
               "x-backend-error": "surprise-remove"}),
    );
    let line = g.wait_for_line(|l| block_event(l, "BLOCK-ADD").is_some(), ADD_TIMEOUT);
    let dev = block_event(&line, "BLOCK-ADD").unwrap();
    check_disk(&mut g, &dev, "fb-d", "fb");
    // Both readers have a request in the device, one blocked in the host's read, when the
    // server dies.
    b.hold();
    start_readers(&mut g, &dev, 2, 2);
    b.kill();
    let event = q
        .wait_event("X_BACKEND_ERROR", Some("fb-d"), Duration::from_secs(30))
        .unwrap_or_else(|| g.fail("no X_BACKEND_ERROR for fb-d"));
    assert_eq!(event["data"]["action"], "surprise-remove", "{event}");
    q.wait_event("DEVICE_DELETED", Some("fb-d"), Duration::from_secs(10))
        .unwrap_or_else(|| g.fail("the failing disk was not pulled out"));
    wait_block_removed(&mut g, &dev);
    let ends = wait_lines(&mut g, &format!("/tmp/readers-{dev}"), 2);
    assert_eq!(ends.matches("EXIT 1").count(), 2, "readers: {ends}");
    let slots = q.ok("x-query-hotplug", json!({}));
    let rp1 = slot(&slots, "rp1");
    assert_eq!(
        (rp1["occupant"].is_null(), &rp1["presence"]),
        (true, &json!(false)),
        "{rp1}"
    );
    q.ok("blockdev-del", json!({"node-name": "fb"}));
    assert_eq!(g.run("echo alive"), "alive");
    let stderr = g.stderr_text();
    assert!(!stderr.contains("panicked"), "{stderr}");

    // ---- Last (it leaves the guest's hot-plug stuck): the drop policy's guest hang. ----
    pin_drop_hang(version, &mut g, &mut q, &dir, "rp0", "pciehp");
}

#[test]
fn backend_failure_linux_6_1() {
    backend_failure("6.1");
}
