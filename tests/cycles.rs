//! Hot-plug cycles leak nothing: 50 add/remove cycles (`HOTPLUG_VMM_HOTPLUG_CYCLES`) on a
//! native slot (pciehp), on an ACPI slot (acpiphp) and by surprise removal, each leaving the VMM
//! with the file descriptors and threads it had, its guest answering.
//!
//! Each runs on a restored guest of the shared machine, on its own, so that the suite's
//! longest parts run side by side with the rest instead of at the end of one test each.

use crate::common;

use std::time::Duration;

use common::hotplug::*;
use common::qmp::QmpClient;
use common::surprise::*;
use common::{BootOptions, Guest, TempDir};
use serde_json::json;

/// A restored guest of `version`'s shared machine with a control socket, node `x` added.
fn restored(version: &str, name: &str) -> (TempDir, Guest, QmpClient) {
    let dir = TempDir::new(&format!("cycles-{name}-{version}"));
    let sock = dir.path("qmp.sock");
    let opts = BootOptions::shared(version).qmp(&sock);
    // With the default `--surprise-bar-reads zero`, Linux's virtio-pci finishes the removal
    // and the slot takes the next disk (tests/surprise.rs).
    let g = Guest::restore(&opts);
    let mut q = QmpClient::negotiated(&sock);
    blockdev_add(&mut q, "x", &make_disk(&dir, "x"));
    (dir, g, q)
}

/// Runs `cycle` `n` times between two counts of the VMM's fds and threads, which must agree.
fn leak_free(
    g: &mut Guest,
    q: &mut QmpClient,
    what: &str,
    mut cycle: impl FnMut(&mut Guest, &mut QmpClient, usize),
) {
    let n = cycles();
    let before = open_fds_and_threads(g.pid());
    for i in 0..n {
        cycle(g, q, i);
    }
    wait_pulled_released(g, q, Duration::from_secs(30));
    let after = open_fds_and_threads(g.pid());
    assert_eq!(
        before, after,
        "(open fds, threads) before and after {n} {what} cycles"
    );
    q.ok("blockdev-del", json!({"node-name": "x"}));
    assert_eq!(g.run("echo alive"), "alive");
    let stderr = g.stderr_text();
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// `device_add` of `id` onto `bus` (at `addr`, if given); returns the guest's block device.
fn add(g: &mut Guest, q: &mut QmpClient, id: &str, bus: &str, addr: Option<&str>) -> String {
    let mut args = json!({"driver": "virtio-blk-pci", "id": id, "drive": "x", "bus": bus});
    if let Some(a) = addr {
        args["addr"] = json!(a);
    }
    q.ok("device_add", args);
    let line = g.wait_for_line(|l| block_event(l, "BLOCK-ADD").is_some(), ADD_TIMEOUT);
    block_event(&line, "BLOCK-ADD").unwrap()
}

/// A graceful removal: `device_del`, `DEVICE_DELETED`, the guest's block device gone.
fn del(g: &mut Guest, q: &mut QmpClient, id: &str, dev: &str) {
    q.ok("device_del", json!({ "id": id }));
    wait_deleted(g, q, id);
    g.wait_for_line(
        |l| block_event(l, "BLOCK-REMOVE").as_deref() == Some(dev),
        ADD_TIMEOUT,
    );
}

/// Native: pciehp powers the slot on, and off after the attention button's 5 s.
#[test]
fn native_cycles_linux_6_1() {
    let (_dir, mut g, mut q) = restored("6.1", "native");
    leak_free(&mut g, &mut q, "native", |g, q, i| {
        let id = format!("x{i}");
        let dev = add(g, q, &id, "rp1", None);
        del(g, q, &id, &dev);
    });
}

/// ACPI: a Device Check brings the disk in, an Eject Request and `_EJ0` take it out.
#[test]
fn acpi_cycles_linux_6_1() {
    let (_dir, mut g, mut q) = restored("6.1", "acpi");
    leak_free(&mut g, &mut q, "ACPI", |g, q, i| {
        let id = format!("x{i}");
        let dev = add(g, q, &id, "pcie.0", Some("3"));
        del(g, q, &id, &dev);
    });
}

/// Surprise removal, native and ACPI slots in turn: the disk goes at once, the guest follows.
#[test]
fn surprise_cycles_linux_6_12() {
    let (_dir, mut g, mut q) = restored("6.12", "surprise");
    leak_free(&mut g, &mut q, "surprise", |g, q, i| {
        let id = format!("x{i}");
        let bus = if i % 2 == 0 { "rp0" } else { "pcie.0" };
        let dev = add(g, q, &id, bus, None);
        pull(g, q, &id, None, None);
        wait_block_removed(g, &dev);
    });
}
