//! Fuzzes the control socket's protocol: the fuzzer's bytes are what clients send, cut into
//! reads of arbitrary sizes, through the framer and a session, with a fake machine behind it
//! whose commands type their arguments as the real ones do. Besides never panicking or
//! growing without bound, for every input:
//!
//! - every frame gets exactly one reply, `{"return": ...}` or `{"error": {"class", "desc"}}`,
//!   whose line is one line of JSON;
//! - a message that is a JSON object with an `id` gets that `id` back;
//! - no command reaches the machine before `qmp_capabilities` succeeded, and after it every
//!   well-formed command that is not built in does.
//!
//! The protocol is the VMM's own source, compiled in here (the VMM is a binary crate).

#![no_main]

use std::sync::atomic::{AtomicUsize, Ordering};

use libfuzzer_sys::fuzz_target;
use serde::Deserialize;
use serde_json::{json, Map, Value};

#[allow(dead_code)]
#[path = "../../vmm/src/qmp/protocol.rs"]
mod protocol;
#[allow(dead_code)]
#[path = "../../vmm/src/qmp/typed.rs"]
mod typed;

use protocol::{Frame, Framer, QmpError, QmpHandler, Session};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct DeviceAdd {
    driver: String,
    id: String,
    drive: String,
    bus: Option<String>,
    addr: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct SurpriseRemove {
    id: String,
    #[serde(rename = "in-flight")]
    in_flight: Option<String>,
}

/// A machine that types arguments and counts what reaches it.
#[derive(Default)]
struct FakeMachine {
    calls: AtomicUsize,
}

impl QmpHandler for FakeMachine {
    fn execute(&self, command: &str, args: &Map<String, Value>) -> Result<Value, QmpError> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        match command {
            "query-status" => {
                typed::parse_args::<typed::NoArgs>(args).map(|_| json!({"running": true}))
            }
            "device_add" => typed::parse_args::<DeviceAdd>(args).map(|_| Value::Null),
            "x-surprise-remove" => {
                typed::parse_args::<SurpriseRemove>(args).map(|_| json!({"failed": 0}))
            }
            _ => Err(QmpError::command_not_found(command)),
        }
    }

    fn commands(&self) -> Vec<String> {
        ["query-status", "device_add", "x-surprise-remove"]
            .map(String::from)
            .to_vec()
    }
}

const BUILT_IN: [&str; 3] = ["qmp_capabilities", "query-version", "query-commands"];

fuzz_target!(|data: &[u8]| {
    // The first byte picks read sizes; the rest is the stream.
    let Some((&seed, stream)) = data.split_first() else {
        return;
    };
    let machine = FakeMachine::default();
    let mut framer = Framer::new();
    let mut session = Session::new();
    let mut frames = Vec::new();
    let mut at = 0;
    let mut step = usize::from(seed % 31) + 1;
    while at < stream.len() {
        let end = (at + step).min(stream.len());
        frames.clear();
        framer.push(&stream[at..end], &mut frames);
        at = end;
        step = step * 7 % 61 + 1;
        for frame in &frames {
            let negotiated = session.negotiated();
            let calls = machine.calls.load(Ordering::Relaxed);
            let reply = session.handle(frame, &machine);
            let reached = machine.calls.load(Ordering::Relaxed) - calls;

            let obj = reply.as_object().expect("a reply is an object");
            let returned = obj.contains_key("return");
            let failed = obj.get("error").is_some_and(|e| {
                e.get("class").is_some_and(Value::is_string)
                    && e.get("desc").is_some_and(Value::is_string)
            });
            assert!(returned != failed, "neither return nor error: {reply}");
            let line = protocol::to_line(&reply);
            assert_eq!(
                line.iter().filter(|&&b| b == b'\n').count(),
                1,
                "one line per reply"
            );
            assert_eq!(line.last(), Some(&b'\n'));

            let Frame::Message(msg) = frame else {
                continue;
            };
            let request = serde_json::from_slice::<Value>(msg).ok();
            let request = request.as_ref().and_then(Value::as_object);
            if let Some(id) = request.and_then(|r| r.get("id")) {
                assert_eq!(obj.get("id"), Some(id), "id not echoed: {reply}");
            }
            if !negotiated {
                assert_eq!(
                    reached, 0,
                    "a command reached the machine before negotiation"
                );
            }
            let command = request
                .and_then(|r| r.get("execute"))
                .and_then(Value::as_str);
            let well_formed = request.is_some_and(|r| {
                r.keys()
                    .all(|k| ["execute", "arguments", "id"].contains(&k.as_str()))
                    && r.get("arguments").is_none_or(Value::is_object)
            });
            if let (true, true, Some(command)) = (negotiated, well_formed, command) {
                let expected = usize::from(!BUILT_IN.contains(&command));
                assert_eq!(
                    reached, expected,
                    "{command}: reached the machine {reached} times"
                );
            }
        }
    }
});
