//! `--hotplug-trace FILE`: one JSON line per hot-plug happening, so that a researcher can read
//! what the guest and the VMM did, in order and with times (SPEC.md §6).
//!
//! Every line is an object with
//! - `t`: seconds since the VMM opened the trace, before building the machine (monotonic clock, microsecond resolution; the guest's
//!   dmesg times count from about the same moment, so the two can be read side by side),
//! - `mono_ns`: `CLOCK_MONOTONIC` in nanoseconds, to line up with other host tools,
//! - `kind`, and the fields of that kind:
//!
//! | kind | fields | written |
//! | --- | --- | --- |
//! | `guest-read`, `guest-write` | `device`, `register`, `value` (hex), `after` (writes) | on the vCPU thread, as the guest accesses Slot Control/Status, Link Status or the ACPI hot-plug controller |
//! | `slot` | `bus`, `change`, `value`, `device` | as a slot changes: the guest's power and indicator commands, and the VMM's insertions, button presses, eject requests, removals |
//! | `qmp-request` | `command`, `arguments` | as a control-socket command starts |
//! | `qmp-reply` | `command`, `ok` or `error` | as it ends |
//! | `qmp-event` | `event`, `data` | as an event is sent |
//!
//! `resources/hotplug-timeline.py` turns a trace into a readable timeline. The file is written
//! line by line (each line in one `write`), so a trace survives a crash up to its last line.

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use devices::register_trace::{RegisterAccess, RegisterTracer};
use serde_json::{json, Map, Value};

struct Trace {
    start: Instant,
    out: Mutex<File>,
}

static TRACE: OnceLock<Trace> = OnceLock::new();
/// Starts writing the trace to `path` (created or truncated); `t` counts from now (the VMM
/// opens it before it builds the machine).
pub fn open(path: &Path) -> std::io::Result<()> {
    let file = File::create(path)?;
    let _ = TRACE.set(Trace {
        start: Instant::now(),
        out: Mutex::new(file),
    });
    Ok(())
}

/// Whether a trace is being written (build records only then).
pub fn enabled() -> bool {
    TRACE.get().is_some()
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes a timespec into the valid, exclusively borrowed `ts`.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64).saturating_mul(1_000_000_000) + ts.tv_nsec as u64
}

/// Writes one record of `kind` with `fields` (an object), if tracing.
pub fn record(kind: &str, fields: Value) {
    let Some(trace) = TRACE.get() else {
        return;
    };
    // Stamped under the lock: records from the vCPU, control and I/O threads reach the file
    // in the order of their timestamps.
    let mut out = trace.out.lock().unwrap_or_else(|e| e.into_inner());
    let mut line = Map::new();
    let t = trace.start.elapsed().as_micros() as f64 / 1e6;
    line.insert("t".into(), json!(t));
    line.insert("mono_ns".into(), json!(monotonic_ns()));
    line.insert("kind".into(), json!(kind));
    if let Value::Object(fields) = fields {
        line.extend(fields);
    }
    let mut text = Value::Object(line).to_string();
    text.push('\n');
    if let Err(e) = out.write_all(text.as_bytes()) {
        log::warn!("hotplug trace: {e}");
    }
}

/// A slot change: `change` of `bus` to `value`, with the device concerned if any.
pub fn slot(bus: &str, change: &str, value: Value, device: Option<&str>) {
    if enabled() {
        record(
            "slot",
            json!({"bus": bus, "change": change, "value": value, "device": device}),
        );
    }
}

/// Writes the guest's register accesses into the trace.
pub struct TraceRegisters;

impl RegisterTracer for TraceRegisters {
    fn access(&self, a: &RegisterAccess<'_>) {
        let mut fields = json!({
            "device": a.device,
            "register": a.register,
            "value": format!("{:#06x}", a.value),
        });
        if let Some(after) = a.after {
            fields["after"] = json!(format!("{after:#06x}"));
        }
        record(if a.write { "guest-write" } else { "guest-read" }, fields);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The only test that opens the (process-wide) trace.
    #[test]
    fn records_from_many_threads_are_in_time_order() {
        let path = std::env::temp_dir().join(format!("trace-test-{}.jsonl", std::process::id()));
        open(&path).unwrap();
        let threads: Vec<_> = (0..4)
            .map(|i| {
                std::thread::spawn(move || {
                    for n in 0..500 {
                        record("test", json!({"thread": i, "n": n}));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        let records: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        // (Other tests running meanwhile may add records of their own.)
        let ours = records.iter().filter(|r| r["kind"] == "test").count();
        assert_eq!(ours, 2000);
        for pair in records.windows(2) {
            assert!(pair[0]["t"].as_f64() <= pair[1]["t"].as_f64(), "{pair:?}");
            assert!(
                pair[0]["mono_ns"].as_u64() <= pair[1]["mono_ns"].as_u64(),
                "{pair:?}"
            );
        }
    }
}
