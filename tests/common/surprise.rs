//! Surprise removal helpers: pulling a disk out of a running guest, and pinning what the
//! guest's kernel does when the removal leaves requests it will wait on forever.

use std::time::Duration;

use super::fuse::FuseDisk;
use super::hotplug::*;
use super::qmp::QmpClient;
use super::{Guest, TempDir};
use serde_json::{json, Value};

/// Pulls `id` out with `in_flight` and `bar_reads` (the VMM's defaults if `None`) and checks
/// the reply and the event.
pub fn pull(
    g: &Guest,
    q: &mut QmpClient,
    id: &str,
    in_flight: Option<&str>,
    bar_reads: Option<&str>,
) -> Value {
    let mut args = json!({"id": id});
    if let Some(p) = in_flight {
        args["in-flight"] = json!(p);
    }
    if let Some(b) = bar_reads {
        args["bar-reads"] = json!(b);
    }
    let reply = q.ok("x-surprise-remove", args);
    if q.wait_event("DEVICE_DELETED", Some(id), Duration::from_secs(5))
        .is_none()
    {
        g.fail(&format!(
            "no DEVICE_DELETED right after x-surprise-remove of {id}"
        ));
    }
    assert_eq!(reply["host-io-pending"], false, "{reply}");
    reply
}

/// Waits until the VMM has let go of every disk pulled out by surprise (x-query-hotplug's
/// `pulled` is empty): each driver has reset its device, so none fails requests any more and
/// their ioeventfds and interrupt routes are gone. Returns the last reply.
pub fn wait_pulled_released(g: &Guest, q: &mut QmpClient, timeout: Duration) -> Value {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let reply = q.ok("x-query-hotplug", json!({}));
        if reply["pulled"].as_array().is_some_and(|p| p.is_empty()) {
            return reply;
        }
        if std::time::Instant::now() > deadline {
            g.fail(&format!(
                "pulled-out disks not released after {timeout:?}: {}",
                reply["pulled"]
            ));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// [`pull`] with the I/O of `held` held: it is released 200 ms after the request is sent,
/// while the VMM waits for the host I/O in progress (up to 500 ms), so that the request being
/// served and those behind it meet the in-flight policy, not the disk.
pub fn pull_releasing(
    g: &Guest,
    q: &mut QmpClient,
    held: &FuseDisk,
    id: &str,
    in_flight: Option<&str>,
    bar_reads: Option<&str>,
) -> Value {
    let release = held.release_after(Duration::from_millis(200));
    let reply = pull(g, q, id, in_flight, bar_reads);
    release.join().unwrap();
    reply
}

/// A fresh disk hot-added to `bus` as `{tag}-d` (node `{tag}-n`, served over FUSE), read by two
/// readers whose requests are held in the device, pulled out with `in_flight` and `bar_reads`.
/// Returns the guest's block device, its PCI function and the reply.
pub fn pull_under_two_readers(
    g: &mut Guest,
    q: &mut QmpClient,
    dir: &TempDir,
    tag: &str,
    bus: &str,
    in_flight: &str,
    bar_reads: &str,
) -> (String, String, Value) {
    let (node, id) = (format!("{tag}-n"), format!("{tag}-d"));
    let held = FuseDisk::start(dir, &node);
    blockdev_add(q, &node, &held.file());
    let dev = hot_add(g, q, &id, &node, bus);
    let pci = g.run(&format!(
        "basename $(readlink -f /sys/block/{dev}/device/..)"
    ));
    held.hold();
    start_readers(g, &dev, 2, 2);
    let reply = pull_releasing(g, q, &held, &id, Some(in_flight), Some(bar_reads));
    (dev, pci, reply)
}

/// Linux's virtio_blk (6.1 and 6.12) under the `drop` policy: a disk pulled out of `bus` while
/// two readers have a request in it, which the device never completes. The guest removes the
/// block device (`del_gendisk` unregisters it first) and then waits in `del_gendisk` for the
/// queue to drain — forever: virtio_blk has no timeout handler. The readers sleep in D state
/// and never end, the removal's thread (pciehp's, or acpiphp's kworker) sleeps in D state,
/// and the function never leaves the guest's bus. The guest's hot-plug is stuck for good after
/// this (the removal holds the PCI rescan lock), so a test calls it last. The VMM's side: the
/// reply counts the two requests as dropped, and it goes on serving its control socket.
/// `remover` names the guest task that runs the removal ("pciehp" for a native slot,
/// "kacpi_hotplug", acpiphp's workqueue, for an ACPI one).
pub fn pin_drop_hang(
    version: &str,
    g: &mut Guest,
    q: &mut QmpClient,
    dir: &TempDir,
    bus: &str,
    remover: &str,
) {
    let (dev, pci, reply) = pull_under_two_readers(g, q, dir, "dh", bus, "drop", "zero");
    // The one whose host read was running finished it, and was dropped all the same.
    assert_eq!(
        (&reply["dropped"], &reply["failed"]),
        (&json!(2), &json!(0)),
        "{reply}"
    );
    wait_block_removed(g, &dev);
    g.run("sleep 5");
    let stuck = d_state_tasks(g);
    let readers = g.run(&format!("cat /tmp/readers-{dev} 2>&1; true"));
    let devices = g.run("echo /sys/bus/pci/devices/*");
    eprintln!(
        "{version} {bus}: after a drop pull: tasks in D state {stuck:?}; readers' ends: {readers}"
    );
    assert_eq!(
        stuck.iter().filter(|t| *t == "dd").count(),
        2,
        "both readers wait for their dropped requests: {stuck:?}"
    );
    assert!(!readers.contains("EXIT"), "no reader ended: {readers}");
    assert!(
        stuck.iter().any(|t| t.contains(remover)),
        "the removal ({remover}) waits in del_gendisk: {stuck:?}"
    );
    assert!(
        devices.contains(pci.trim()),
        "{pci} never leaves the bus: {devices}"
    );
    q.ok("query-status", json!({}));
}
