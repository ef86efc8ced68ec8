//! The control socket on a running guest (SPEC.md §5): greeting and negotiation, the machine
//! queries, bad input answered with an error while the guest keeps running, and `quit`.

use crate::common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use common::{BootOptions, Guest};
use serde_json::{json, Value};

struct Client {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Client {
    fn connect(path: &std::path::Path) -> (Client, Value) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => panic!("connect {}: {e}", path.display()),
            }
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        let mut c = Client {
            reader: BufReader::new(stream.try_clone().unwrap()),
            writer: stream,
        };
        let greeting = c.read();
        (c, greeting)
    }

    fn read(&mut self) -> Value {
        let mut line = String::new();
        self.reader.read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?}: {e}"))
    }

    fn send_raw(&mut self, s: &str) -> Value {
        self.writer.write_all(s.as_bytes()).unwrap();
        loop {
            let v = self.read();
            if v.get("event").is_none() {
                return v;
            }
        }
    }

    fn cmd(&mut self, execute: &str, args: Value) -> Value {
        let msg = json!({"execute": execute, "arguments": args, "id": execute});
        self.send_raw(&format!("{msg}\n"))
    }
}

#[test]
fn control_socket_on_a_running_guest() {
    let version = common::kernel_versions()[0].clone();
    let dir = common::TempDir::new("qmp");
    let disk = dir.path("d.img");
    common::make_mbr_disk(&disk, 16, &[4]);
    let sock = dir.path("qmp.sock");
    let opts = BootOptions::shared(&version).qmp(&sock);
    let mut g = Guest::restore(&opts);

    let (mut a, greeting) = Client::connect(&sock);
    assert!(greeting["QMP"]["version"].is_object(), "{greeting}");
    assert_eq!(greeting["QMP"]["capabilities"], json!([]));
    // Nothing before negotiation.
    let early = a.cmd("query-status", json!({}));
    assert_eq!(early["error"]["class"], "CommandNotFound", "{early}");
    assert_eq!(a.cmd("qmp_capabilities", json!({}))["return"], json!({}));

    // A second client at the same time.
    let (mut b, _) = Client::connect(&sock);
    assert_eq!(b.cmd("qmp_capabilities", json!({}))["return"], json!({}));

    let status = a.cmd("query-status", json!({}));
    assert_eq!(status["return"]["running"], true, "{status}");
    assert_eq!(status["id"], "query-status");
    // A read-only disk on the root bus, where the guest finds it.
    let added = b.cmd(
        "blockdev-add",
        json!({"driver": "raw", "node-name": "d0", "read-only": true,
               "file": {"driver": "file", "filename": disk.display().to_string()}}),
    );
    assert_eq!(added["return"], json!({}), "{added}");
    let added = b.cmd(
        "device_add",
        json!({"driver": "virtio-blk-pci", "id": "data0", "drive": "d0", "bus": "pcie.0"}),
    );
    assert_eq!(added["return"], json!({}), "{added}");
    let line = g.wait_for_line(
        |l| common::hotplug::block_event(l, "BLOCK-ADD").is_some(),
        common::hotplug::ADD_TIMEOUT,
    );
    let dev = common::hotplug::block_event(&line, "BLOCK-ADD").unwrap();
    assert_eq!(g.run(&format!("cat /sys/block/{dev}/ro")), "1");
    let pci = b.cmd("query-pci", json!({}));
    let devices = pci["return"][0]["devices"].as_array().unwrap().clone();
    let disk_fn = devices
        .iter()
        .find(|d| d["qdev_id"] == "data0")
        .unwrap_or_else(|| panic!("data0 not in query-pci: {pci}"));
    assert_eq!(disk_fn["slot"], 1);
    assert_eq!(disk_fn["id"]["vendor"], 0x1af4);
    assert_eq!(disk_fn["id"]["device"], 0x1042);
    assert!(devices
        .iter()
        .any(|d| d["id"]["vendor"] == 0x1b36 && d["slot"] == 0));
    let block = a.cmd("query-block", json!({}));
    assert_eq!(block["return"][0]["qdev"], "data0", "{block}");
    assert_eq!(block["return"][0]["inserted"]["ro"], true);

    // Bad input: an error reply each, the socket keeps serving, the guest keeps running.
    for (bad, class) in [
        ("{not json\n", "GenericError"),
        ("[1, 2]\n", "GenericError"),
        ("{\"arguments\": {}}\n", "GenericError"),
        ("{\"execute\": \"no-such-command\"}\n", "CommandNotFound"),
        (
            "{\"execute\": \"query-status\", \"arguments\": {\"x\": 1}}\n",
            "GenericError",
        ),
        ("{\"execute\": 42}\n", "GenericError"),
    ] {
        let r = a.send_raw(bad);
        assert_eq!(r["error"]["class"], class, "{bad:?} -> {r}");
        assert!(!r["error"]["desc"].as_str().unwrap().is_empty());
    }
    assert_eq!(a.cmd("query-status", json!({}))["return"]["running"], true);
    assert_eq!(g.run("echo alive"), "alive");

    // A guest that keeps doing what the VMM ignores gets a burst of log lines and a count
    // (issue 21): 12 requests for a sleep state the DSDT does not offer (SLP_EN | SLP_TYP 1 to
    // the sleep control register, port 0x600, through 6.1's /dev/port; 6.12's config has none).
    if g.run("test -c /dev/port && echo yes || echo no") == "yes" {
        g.run(
            "i=0; while [ $i -lt 12 ]; do printf '\\044' | dd of=/dev/port bs=1 seek=1536 \
             2>/dev/null; i=$((i+1)); done",
        );
        let log = a.cmd("x-query-guest-log", json!({}));
        let sleep = log["return"]
            .as_array()
            .and_then(|kinds| kinds.iter().find(|k| k["kind"] == "unsupported sleep type"))
            .unwrap_or_else(|| panic!("no sleep requests counted: {log}"))
            .clone();
        assert_eq!(sleep["count"], 12, "{log}");
        assert_eq!(sleep["suppressed"], 2, "{log}");
        let lines = g.stderr_text().matches("unsupported sleep type").count();
        assert!(
            (10..=11).contains(&lines),
            "{lines} log lines for 12 requests"
        );
    } else {
        assert_ne!(version, "6.1", "6.1's test kernel has /dev/port");
    }

    // quit ends the VMM with status 0 and removes the socket.
    assert_eq!(b.cmd("quit", json!({}))["return"], json!({}));
    let status = g.wait_exit(Duration::from_secs(60));
    assert_eq!(status.code(), Some(0));
    assert!(!sock.exists(), "the socket file outlived the VMM");
}
