//! Surprise removal (issue 6, SPEC.md §5–§6) on real guests: a disk pulled out of a native
//! slot (root port, guest pciehp) and out of ACPI slots (a root port in ACPI mode and the root
//! bus, guest acpiphp), each time while the guest reads it in a loop and while it writes to an
//! ext4 mounted from it. The readers' disk holds its reads on the host until the pull, so that
//! every reader has a request in the device when it goes, however slow the guest.
//!
//! What must hold, from the guest's side: it removes the device (its block device goes away;
//! on a native slot pciehp logs "Link Down"), the reading and writing processes end (those
//! whose requests were failed with an I/O error, the block layer logging it) instead of hanging,
//! the shell stays responsive, and the same slot takes a new disk right after, which the guest
//! reads. From the VMM's: `x-surprise-remove` returns at once with what it did to the requests
//! in flight, `DEVICE_DELETED` follows, the VMM keeps running and the trace records every step
//! (50 surprise cycles that must leak nothing are in tests/cycles.rs).
//!
//! The runs pull with the defaults, so that they are what a new user gets: BARs that read zero
//! after the pull. With BARs reading all-ones, as on hardware (`bar-reads=all-ones`), Linux's
//! virtio-pci (`vp_reset`, 6.1 and 6.12 alike) polls the departed device's status until it
//! reads zero, forever — the disk goes, but the function never leaves the guest's bus and the
//! guest's hot-plug is stuck for good. `pin_virtio_reset_spin` shows that, last.
//!
//! `late_answer` pins the guest's race that is left (docs/surprise-removal.md): an answer that
//! reaches Linux only after its removal began is never taken.

use crate::common;

use std::path::PathBuf;
use std::time::Duration;

use common::fuse::FuseDisk;
use common::hotplug::*;
use common::qmp::QmpClient;
use common::surprise::*;
use common::{BootOptions, Guest, TempDir};
use serde_json::{json, Value};

/// What one scenario pulls the disk from under.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Load {
    Readers,
    Ext4Writer,
}

/// Hot-adds a disk on `bus`, puts `load` on it, pulls it out (policy `fail`), and checks the
/// guest's side; then the slot takes a fresh disk that the guest reads. Returns the guest's
/// kernel log lines of the removal.
fn scenario(
    g: &mut Guest,
    q: &mut QmpClient,
    dir: &TempDir,
    bus: &str,
    load: Load,
    tag: &str,
) -> String {
    let node = format!("{tag}-n");
    // The disk holds its I/O on the host from the moment the load is running until the pull,
    // so that the pull finds each reader's request, or the writer's fsync, in the device:
    // on a PVM host a guest spends far longer between two requests than the host takes to
    // serve one, and a pull would rarely find one in flight otherwise.
    let image = make_disk(dir, &node);
    if load == Load::Ext4Writer {
        format_ext4(&image);
    }
    let held = FuseDisk::serve(dir, &node, &image);
    blockdev_add(q, &node, &held.file());
    let id = format!("{tag}-d");
    let dev = hot_add(g, q, &id, &node, bus);
    g.run("dmesg -c > /dev/null");
    match load {
        Load::Readers => {
            held.hold();
            start_readers(g, &dev, 3, 3);
        }
        Load::Ext4Writer => {
            start_ext4_writer(g, &dev);
            held.hold();
            wait_in_flight(g, &dev, Direction::Write, 1);
        }
    }

    let reply = pull_releasing(g, q, &held, &id, None, None);
    eprintln!("{bus} ({load:?}): x-surprise-remove: {reply}");
    assert_eq!(reply["in-flight"], "fail", "{reply}");
    // The default: what the supported guests survive.
    assert_eq!(reply["bar-reads"], "zero", "{reply}");
    assert_eq!(reply["dropped"], 0, "{reply}");
    let failed = reply["failed"].as_u64().unwrap();
    wait_block_removed(g, &dev);

    // The processes ended with an I/O error instead of hanging.
    match load {
        Load::Readers => {
            let ends = wait_ends(g, q, &format!("/tmp/readers-{dev}"), 3);
            let errors = g.run(&format!("cat /tmp/dd-{dev}-*"));
            let kernel = g.run("dmesg | tail -30 | sed 's/^/K: /'");
            eprintln!("{bus}: readers ended: {ends}\n{errors}\n{reply}\n{kernel}");
            assert_eq!(ends.matches("EXIT 1").count(), 3, "{bus}: readers: {ends}");
            // Three requests were in the device: the one the host was reading when the pull
            // came (its host I/O finishes within the pull's wait) and the two waiting behind
            // it are all failed, so every reader gets EIO and none reads on into a device
            // that is no longer there.
            assert_eq!(failed, 3, "{bus}: {reply}");
            let eio =
                errors.matches("I/O error").count() + errors.matches("Input/output error").count();
            assert_eq!(eio as u64, failed, "{bus}: dd's errors: {errors} {reply}");
            assert!(
                kernel.contains(&format!("I/O error, dev {dev}")),
                "{bus}: the block layer reports the failed requests:\n{kernel}"
            );
        }
        Load::Ext4Writer => {
            // The writer's fsync was waiting on its data: failed, it fails, and the file
            // system issues nothing more (see start_ext4_writer).
            assert!(failed >= 1, "{bus}: {reply}");
            let end = wait_ends(g, q, &format!("/tmp/writer-{dev}"), 1);
            assert!(end.contains("WRITER EXIT 1"), "{bus}: writer: {end}");
            // The file system is dead; a lazy unmount lets it go.
            g.run(&format!("umount -l /mnt/{dev}"));
        }
    }
    let dmesg = g.run("dmesg | sed 's/^/K: /'");
    eprintln!("{bus} ({load:?}): guest kernel log of the removal:\n{dmesg}");
    assert!(
        !guest_disks(g).iter().any(|(_, s)| *s == id),
        "{bus}: {id} gone from /sys/block"
    );
    assert_eq!(g.run("echo alive"), "alive");

    // The VMM's records: the slot is empty, the node is free.
    let slots = q.ok("x-query-hotplug", json!({}));
    let s = slot(&slots, bus);
    assert_eq!(s["occupant"], Value::Null, "{s}");
    assert_eq!(s["presence"], false, "{s}");
    if s["mode"] == "native" {
        assert_eq!(s["link"], false, "{s}");
    }
    q.ok("blockdev-del", json!({"node-name": node}));

    // The same slot takes a new disk right away.
    let node2 = format!("{tag}-n2");
    blockdev_add(q, &node2, &make_disk(dir, &node2));
    let id2 = format!("{tag}-d2");
    let dev2 = hot_add(g, q, &id2, &node2, bus);
    pull(g, q, &id2, None, None);
    wait_block_removed(g, &dev2);
    q.ok("blockdev-del", json!({"node-name": node2}));
    dmesg
}

/// Waits for the `lines` exit lines of the processes that used a pulled disk. If they never
/// come, fails with the guest's side ([`try_wait_lines`]) and the VMM's: where the rings of the
/// pulled disks stand — `used` ahead of `used-event` means the guest never took a completion
/// the device published (the guest's race in docs/surprise-removal.md).
fn wait_ends(g: &mut Guest, q: &mut QmpClient, path: &str, lines: usize) -> String {
    try_wait_lines(g, path, lines).unwrap_or_else(|why| {
        let pulled = q.ok("x-query-hotplug", json!({}))["pulled"].clone();
        g.fail(&format!("{why}\nthe VMM's pulled disks: {pulled}"))
    })
}

/// A disk pulled out (policy `fail`) from under a reader that nothing holds, as in the demo.
/// Its requests spend most of their time in the guest's block stack, not in the device, so the
/// pull rarely finds one in the device; the reader's next request is submitted after the pull,
/// before the guest's driver learns of it (on a native slot, when pciehp's thread gets to
/// virtio-pci's removal). The device fails such requests until the driver resets it. Were
/// they left alone, virtio_blk's `del_gendisk` would wait for them forever: the reader and
/// the removal in D state, the function on the guest's bus, the guest's hot-plug stuck.
/// The device fails them on the vCPU that notifies it, so that the answer is there before
/// that vCPU runs on: the guest's removal on the other vCPU ignores an answer it has not taken
/// when it marks the queue broken (docs/surprise-removal.md). (Run with `RUST_LOG=info` to see
/// how many requests the device failed after the pull: none or one in the runs here.)
fn free_reader(g: &mut Guest, q: &mut QmpClient, dir: &TempDir, bus: &str, tag: &str) {
    let (node, id) = (format!("{tag}-n"), format!("{tag}-d"));
    blockdev_add(q, &node, &make_disk(dir, &node));
    let dev = hot_add(g, q, &id, &node, bus);
    let pci = g.run(&format!(
        "basename $(readlink -f /sys/block/{dev}/device/..)"
    ));
    start_readers(g, &dev, 1, 0);
    // Reading steadily: some reads done.
    g.run(&format!(
        "for i in $(seq 1 60); do set -- $(cat /sys/block/{dev}/stat); [ $1 -ge 10 ] && break; sleep 0.5; done"
    ));
    let reply = pull(g, q, &id, None, None);
    eprintln!("{bus}: free reader: x-surprise-remove: {reply}");
    assert_eq!(reply["in-flight"], "fail", "{reply}");
    wait_block_removed(g, &dev);
    let end = wait_ends(g, q, &format!("/tmp/readers-{dev}"), 1);
    let error = g.run(&format!("cat /tmp/dd-{dev}-1"));
    assert!(end.contains("EXIT 1"), "{bus}: reader: {end} {error}");
    // virtio_blk's removal got every request back, virtio-pci reset the device, and the
    // function left the guest's bus.
    let (devices, _) = g.run_status(
        &format!(
            "for i in $(seq 1 120); do [ -e /sys/bus/pci/devices/{pci} ] || break; sleep 0.5; done;              echo /sys/bus/pci/devices/*"
        ),
        Duration::from_secs(120),
    );
    let stuck = d_state_tasks(g);
    assert!(
        !devices.contains(pci.trim()) && stuck.is_empty(),
        "{bus}: {pci} still on the guest's bus ({devices}), tasks in D state: {stuck:?}
{}",
        g.run("dmesg | tail -20")
    );
    // The driver's reset reached the device: the VMM let go of it.
    wait_pulled_released(g, q, Duration::from_secs(10));
    q.ok("blockdev-del", json!({"node-name": node}));
    // With RUST_LOG=info: how many requests came after the pull.
    if let Some(l) = g
        .stderr_text()
        .lines()
        .rfind(|l| l.contains("after the pull"))
    {
        eprintln!("{bus}: VMM: {l}");
    }
}

/// The suite on `version`: `HOTPLUG_VMM_SURPRISE_RUNS` times in a row (1 unless set), each on
/// a guest restored afresh with `HOTPLUG_VMM_SURPRISE_CPUS` vCPUs (2 unless set; see
/// `surprise_once`). Every run goes to its end; the test fails if any did, naming each failed
/// run and why.
fn surprise(version: &str) {
    let runs = common::env_number("HOTPLUG_VMM_SURPRISE_RUNS", 1);
    let cpus = common::env_number("HOTPLUG_VMM_SURPRISE_CPUS", 2) as u8;
    if runs == 1 {
        return surprise_once(version, cpus);
    }
    let mut failed = Vec::new();
    for run in 1..=runs {
        let started = std::time::Instant::now();
        let outcome = std::panic::catch_unwind(|| surprise_once(version, cpus));
        let took = started.elapsed().as_secs();
        match outcome {
            Ok(()) => {
                eprintln!("surprise {version} {cpus} vCPUs: run {run}/{runs} passed ({took} s)")
            }
            Err(e) => {
                let why = e
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                eprintln!("surprise {version} {cpus} vCPUs: run {run}/{runs} FAILED ({took} s)");
                failed.push(format!("run {run}: {}", why.lines().next().unwrap_or("")));
            }
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {runs} runs failed: {failed:#?}",
        failed.len()
    );
}

fn surprise_once(version: &str, cpus: u8) {
    let dir = TempDir::new(&format!("surprise-{version}"));
    let sock = dir.path("qmp.sock");
    let trace = dir.path("trace.jsonl");
    // Two vCPUs unless HOTPLUG_VMM_SURPRISE_CPUS says, as the demo runs: free_reader's reader
    // then submits a request after the pull every time (on one vCPU while the guest handles
    // the slot's event on the other); on one it seldom does. What made two fail (the guest
    // ignoring an answer it had not taken when its removal began) is in
    // docs/surprise-removal.md, with what the device does about it.
    // The shared machine: rp0 and rp2 native, rp3 in ACPI mode.
    let opts = BootOptions::shared(version)
        .cpus(cpus)
        .qmp(&sock)
        .hotplug_trace(&trace);
    let mut g = Guest::restore(&opts);
    let mut q = QmpClient::negotiated(&sock);

    // ---- Bad input: an error each, nothing changes. ----
    for (args, needle) in [
        (json!({}), "id"),
        (json!({"id": "nope"}), "nope"),
        (json!({"id": "nope", "in-flight": "later"}), "in-flight"),
        (json!({"id": 5}), "id"),
        (json!({"id": "nope", "bogus": 1}), "bogus"),
    ] {
        let e = q.err("x-surprise-remove", args.clone());
        assert!(e.contains(needle), "{args}: {e}");
    }

    // ---- Native slot (pciehp): readers, then an ext4 writer. ----
    let native = scenario(&mut g, &mut q, &dir, "rp0", Load::Readers, "nr")
        + &scenario(&mut g, &mut q, &dir, "rp0", Load::Ext4Writer, "nw");
    assert!(
        native.contains("Slot(0): Link Down") || native.contains("Slot(0): Card not present"),
        "pciehp saw the card go:\n{native}"
    );
    // ---- ACPI slots (acpiphp): a root port in ACPI mode, and the root bus. ----
    scenario(&mut g, &mut q, &dir, "rp3", Load::Readers, "ar");
    scenario(&mut g, &mut q, &dir, "pcie.0", Load::Ext4Writer, "bw");
    // ---- A reader nothing holds, native and ACPI. ----
    free_reader(&mut g, &mut q, &dir, "rp0", "nf");
    free_reader(&mut g, &mut q, &dir, "rp3", "af");

    // ---- The trace has every step. ----
    check_trace(&std::fs::read_to_string(&trace).unwrap());

    pin_virtio_reset_spin(version, &mut g, &mut q, &dir);
    // The guest's shell and the VMM go on.
    assert_eq!(g.run("echo alive"), "alive");
    q.ok("query-status", json!({}));
    let slots = q.ok("x-query-hotplug", json!({}));
    assert_eq!(slot(&slots, "rp2")["presence"], false, "{slots}");
    let stderr = g.stderr_text();
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// Hardware-faithful BARs: Linux's virtio-pci spins in `vp_reset` after the disk is gone.
fn pin_virtio_reset_spin(version: &str, g: &mut Guest, q: &mut QmpClient, dir: &TempDir) {
    let (dev, pci, reply) = pull_under_two_readers(g, q, dir, "vr", "rp2", "fail", "all-ones");
    assert_eq!(reply["failed"], 2, "{reply}");
    assert_eq!(reply["bar-reads"], "all-ones", "{reply}");
    // The block layer lets go (readers fail, the disk goes) ...
    wait_block_removed(g, &dev);
    let ends = wait_lines(g, &format!("/tmp/readers-{dev}"), 2);
    assert_eq!(ends.matches("EXIT 1").count(), 2, "readers: {ends}");
    // ... then virtio_pci_remove -> vp_reset polls device_status, which reads 0xff, forever:
    // pciehp's thread for rp2 sleeps in D state and the function never leaves the bus.
    g.run("sleep 5");
    // The spinning thread alternates between msleep (D) and the status read (R): one look can
    // catch it reading, so look up to five times, a second apart.
    let mut stuck = Vec::new();
    for _ in 0..5 {
        stuck = d_state_tasks(g);
        if stuck.iter().any(|t| t.contains("pciehp")) {
            break;
        }
        g.run("sleep 1");
    }
    eprintln!("{version}: tasks in D state after pulling with all-ones BARs: {stuck:?}");
    assert!(
        stuck.iter().any(|t| t.contains("pciehp")),
        "pciehp's thread spins in vp_reset: {stuck:?}"
    );
    let devices = g.run("echo /sys/bus/pci/devices/*");
    assert!(
        devices.contains(pci.trim()),
        "{pci} still on the guest's bus: {devices}"
    );
}

/// The guest's race of docs/surprise-removal.md, made deterministic: Linux's virtio-pci (6.1,
/// 6.12) ignores an answer that reaches it only after its removal began. Two readers each have
/// a request in a disk on rp0; the guest masks the function's queue vectors itself (in the
/// MSI-X table, with `barpoke` from a tool disk); the disk is pulled out and both requests are
/// failed at once, their answers in the used ring and their interrupts pending behind the mask,
/// so the driver cannot take them (the VMM's wait for them gives up: `collected` false). Once
/// the guest's removal has begun — its block device is gone, and virtio-pci marks the queues
/// broken before it unregisters the disk — the guest unmasks the vectors: the interrupts come,
/// the guest counts them and takes no answer. The VMM's rings show it (`used` ahead of
/// `used-event`), the readers and pciehp's thread sleep in D state for good, and the function
/// never leaves the bus: the hang the race leaves when it is lost, which only the guest can
/// close. The guest's hot-plug is stuck after this, so the test has a guest of its own.
fn late_answer(version: &str) {
    let dir = TempDir::new(&format!("late-answer-{version}"));
    let sock = dir.path("qmp.sock");
    let opts = BootOptions::shared(version).cpus(2).qmp(&sock);
    let mut g = Guest::restore(&opts);
    let mut q = QmpClient::negotiated(&sock);
    let (g, q) = (&mut g, &mut q);

    // The tool, on an ext4 disk of its own in rp2.
    let tools = dir.path("tools");
    std::fs::create_dir(&tools).unwrap();
    common::build_guest_tool("barpoke", &tools);
    let image = make_disk(&dir, "la-tools");
    format_ext4_with(&image, Some(&tools));
    blockdev_add(q, "la-tools", &image);
    let tdev = hot_add(g, q, "la-tools-d", "la-tools", "rp2");
    g.run(&format!(
        "mkdir -p /mnt/la && mount /dev/{tdev} /mnt/la && cp /mnt/la/barpoke /tmp/ && umount /mnt/la"
    ));

    let held = FuseDisk::start(&dir, "la-n");
    blockdev_add(q, "la-n", &held.file());
    let dev = hot_add(g, q, "la-d", "la-n", "rp0");
    let pci = g.run(&format!(
        "basename $(readlink -f /sys/block/{dev}/device/..)"
    ));
    let virtio = g.run(&format!("basename $(readlink -f /sys/block/{dev}/device)"));
    // virtio-pci gives the configuration vector 0 and queue n vector n + 1.
    let req = format!("{}-req.", virtio.trim());
    let interrupts = |g: &mut Guest| -> (usize, u64) {
        let lines = g.run(&format!("grep -F {req} /proc/interrupts"));
        let counts = lines.lines().map(|l| {
            l.split_whitespace()
                .skip(1)
                .map_while(|c| c.parse::<u64>().ok())
                .sum::<u64>()
        });
        (lines.lines().count(), counts.sum())
    };
    let (queues, _) = interrupts(g);
    assert!(queues >= 1, "{virtio}'s queue vectors in /proc/interrupts");
    let control = |vector: u64, value: u32| {
        use devices::pci::msix::{MSIX_ENTRY_VECTOR_CONTROL, MSIX_TABLE_ENTRY_SIZE};
        let entry = devices::virtio::pci::MSIX_TABLE_OFFSET + MSIX_TABLE_ENTRY_SIZE * vector;
        format!("{:#x}={value}", entry + MSIX_ENTRY_VECTOR_CONTROL)
    };
    let mask: Vec<String> = (1..=queues as u64).map(|v| control(v, 1)).collect();
    let unmask: Vec<String> = (1..=queues as u64).map(|v| control(v, 0)).collect();

    held.hold();
    start_readers(g, &dev, 2, 2);
    g.run(&format!(
        "/tmp/barpoke /sys/bus/pci/devices/{}/resource0 {} wait:/tmp/unmask {} > /tmp/barpoke.out 2>&1 &",
        pci.trim(),
        mask.join(" "),
        unmask.join(" ")
    ));
    wait_lines(g, "/tmp/barpoke.out", queues);
    let (_, masked) = interrupts(g);

    let reply = pull_releasing(g, q, &held, "la-d", Some("fail"), Some("zero"));
    eprintln!("{version}: late answer: x-surprise-remove: {reply}");
    // Both requests failed at once; the driver, its vectors masked, took neither answer.
    assert_eq!(
        (&reply["failed"], &reply["collected"]),
        (&json!(2), &json!(false)),
        "{reply}"
    );
    // The guest's removal has begun: virtio-pci broke the queues, then unregistered the disk.
    wait_block_removed(g, &dev);
    assert_eq!(interrupts(g).1, masked, "the mask held the interrupts back");
    g.run("touch /tmp/unmask");
    wait_lines(g, "/tmp/barpoke.out", 2 * queues + 1);
    g.run("sleep 3");
    let (_, delivered) = interrupts(g);
    let pulled = q.ok("x-query-hotplug", json!({}))["pulled"].clone();
    let stuck = d_state_tasks(g);
    let readers = g.run(&format!("cat /tmp/readers-{dev} 2>&1; true"));
    let devices = g.run("echo /sys/bus/pci/devices/*");
    eprintln!(
        "{version}: late answer: interrupts {masked} -> {delivered}; pulled {pulled}; \
         tasks in D state {stuck:?}; readers' ends: {readers}"
    );
    assert!(
        delivered > masked,
        "the guest took the interrupts: {delivered}"
    );
    let disk = pulled
        .as_array()
        .and_then(|p| p.iter().find(|d| d["id"] == "la-d"))
        .unwrap_or_else(|| panic!("la-d still fails requests: {pulled}"));
    // Past `used-event` the driver has taken nothing: both answers are there, untaken.
    let untaken: u64 = disk["queues"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let (used, seen) = (
                r["used"].as_u64().unwrap(),
                r["used-event"].as_u64().unwrap(),
            );
            u64::from((used as u16).wrapping_sub(seen as u16))
        })
        .sum();
    assert_eq!(untaken, 2, "the answers the driver never took: {disk}");
    assert_eq!(
        stuck.iter().filter(|t| *t == "dd").count(),
        2,
        "both readers wait for answers they were given: {stuck:?}"
    );
    assert!(!readers.contains("EXIT"), "no reader ended: {readers}");
    assert!(
        stuck.iter().any(|t| t.contains("pciehp")),
        "the removal waits in del_gendisk: {stuck:?}"
    );
    assert!(
        devices.contains(pci.trim()),
        "{pci} never leaves the bus: {devices}"
    );
    q.ok("query-status", json!({}));
}

/// The trace of the run holds, in order, a surprise removal's request, the slot change with
/// what happened to the requests in flight, the event, the guest's reads of Slot Status and its
/// ACPI methods' accesses to the controller.
fn check_trace(text: &str) {
    let records: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let find = |from: usize, pred: &dyn Fn(&Value) -> bool| -> usize {
        from + records[from..]
            .iter()
            .position(pred)
            .unwrap_or_else(|| panic!("trace lacks a record after #{from}"))
    };
    let request = find(0, &|r| {
        r["kind"] == "qmp-request"
            && r["command"] == "x-surprise-remove"
            && r["arguments"]["id"] == "nr-d"
    });
    let removed = find(request, &|r| {
        r["kind"] == "slot" && r["change"] == "card-removed" && r["device"] == "nr-d"
    });
    assert_eq!(
        records[removed]["value"]["surprise"], true,
        "{}",
        records[removed]
    );
    let event = find(removed, &|r| {
        r["kind"] == "qmp-event" && r["event"] == "DEVICE_DELETED"
    });
    let status_read = find(event, &|r| {
        r["kind"] == "guest-read" && r["device"] == "rp0" && r["register"] == "SLTSTA"
    });
    find(status_read, &|r| {
        r["kind"] == "guest-write" && r["device"] == "rp0" && r["register"] == "SLTSTA"
    });
    // The free reader's disk went on failing requests until its driver reset it.
    let released = find(0, &|r| {
        r["kind"] == "slot" && r["change"] == "pulled-device-released" && r["device"] == "nf-d"
    });
    assert_eq!(
        records[released]["value"]["by"], "driver-reset",
        "{}",
        records[released]
    );
    // The ACPI side: the bus check the guest read and acknowledged.
    find(0, &|r| {
        r["kind"] == "guest-read" && r["register"] == "BUS_CHECK" && r["value"] != "0x0000"
    });
    let mut times = records.iter().map(|r| r["t"].as_f64().unwrap());
    let mut last = times.next().unwrap();
    for t in times {
        assert!(t >= last, "trace times are monotonic");
        last = t;
    }
    // The timeline script reads it.
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../resources/hotplug-timeline.py");
    let tmp = std::env::temp_dir().join(format!("trace-{}.jsonl", std::process::id()));
    std::fs::write(&tmp, text).unwrap();
    let out = std::process::Command::new("python3")
        .arg(&script)
        .arg(&tmp)
        .arg("--no-queries")
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&tmp);
    let timeline = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for needle in [
        "-> x-surprise-remove",
        "slot: card-removed",
        "guest reads  SLTSTA",
        "PDC",
        "DLLSC",
    ] {
        assert!(
            timeline.contains(needle),
            "timeline lacks {needle:?}:\n{timeline}"
        );
    }
}

#[test]
fn surprise_removal_linux_6_1() {
    surprise("6.1");
}

#[test]
fn surprise_removal_linux_6_12() {
    surprise("6.12");
}

#[test]
fn late_answer_linux_6_1() {
    late_answer("6.1");
}

#[test]
fn late_answer_linux_6_12() {
    late_answer("6.12");
}
