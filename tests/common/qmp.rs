//! A small QMP client for the tests: commands, replies, and events kept until asked for.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

pub struct QmpClient {
    stream: UnixStream,
    buf: Vec<u8>,
    /// Events received and not yet taken by [`wait_event`](Self::wait_event).
    pub events: VecDeque<Value>,
    /// Every event received, in order.
    pub all_events: Vec<Value>,
}

impl QmpClient {
    /// Connects (retrying for up to 30 s while the VMM starts); returns the client and the
    /// greeting.
    pub fn connect(path: &Path) -> (QmpClient, Value) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Err(e) => panic!("connect {}: {e}", path.display()),
            }
        };
        let mut c = QmpClient {
            stream,
            buf: Vec::new(),
            events: VecDeque::new(),
            all_events: Vec::new(),
        };
        let greeting = c.read_message(Duration::from_secs(30)).expect("a greeting");
        (c, greeting)
    }

    /// Connects and negotiates capabilities.
    pub fn negotiated(path: &Path) -> QmpClient {
        let (mut c, _) = Self::connect(path);
        let r = c.cmd("qmp_capabilities", json!({}));
        assert_eq!(r["return"], json!({}), "{r}");
        c
    }

    /// The next message, or `None` if none came within `timeout`.
    fn read_message(&mut self, timeout: Duration) -> Option<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=i).collect();
                let text = String::from_utf8_lossy(&line);
                return Some(
                    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{text:?}: {e}")),
                );
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            self.stream.set_read_timeout(Some(left)).unwrap();
            let mut chunk = [0u8; 4096];
            match self.stream.read(&mut chunk) {
                Ok(0) => panic!("QMP connection closed"),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return None
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => panic!("QMP read: {e}"),
            }
        }
    }

    /// Sends `raw` and returns the reply (events that come first are queued).
    pub fn send_raw(&mut self, raw: &str) -> Value {
        self.stream.write_all(raw.as_bytes()).unwrap();
        loop {
            let v = self
                .read_message(Duration::from_secs(60))
                .unwrap_or_else(|| panic!("no reply to {raw:?}"));
            if v.get("event").is_some() {
                self.all_events.push(v.clone());
                self.events.push_back(v);
            } else {
                return v;
            }
        }
    }

    /// Runs `execute` with `args`; returns the whole reply.
    pub fn cmd(&mut self, execute: &str, args: Value) -> Value {
        let msg = json!({"execute": execute, "arguments": args});
        self.send_raw(&format!("{msg}\n"))
    }

    /// Runs `execute` and requires success; returns `return`.
    pub fn ok(&mut self, execute: &str, args: Value) -> Value {
        let r = self.cmd(execute, args.clone());
        assert!(r.get("return").is_some(), "{execute} {args} -> {r}");
        r["return"].clone()
    }

    /// Runs `execute` and requires an error; returns its description.
    pub fn err(&mut self, execute: &str, args: Value) -> String {
        let r = self.cmd(execute, args.clone());
        assert!(
            r.get("error").is_some(),
            "{execute} {args} should fail: {r}"
        );
        assert!(r["error"]["class"].is_string(), "{r}");
        r["error"]["desc"].as_str().unwrap().to_string()
    }

    /// Waits for the first event (queued or new) for which `pred` holds; earlier events that do
    /// not match stay queued.
    pub fn wait_event_where(
        &mut self,
        pred: impl Fn(&Value) -> bool,
        timeout: Duration,
    ) -> Option<Value> {
        if let Some(i) = self.events.iter().position(&pred) {
            return self.events.remove(i);
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let v = self.read_message(left)?;
            if v.get("event").is_none() {
                panic!("unexpected reply {v}");
            }
            self.all_events.push(v.clone());
            if pred(&v) {
                return Some(v);
            }
            self.events.push_back(v);
        }
    }

    /// Waits for event `name` (for device `device`, if given).
    pub fn wait_event(
        &mut self,
        name: &str,
        device: Option<&str>,
        timeout: Duration,
    ) -> Option<Value> {
        self.wait_event_where(
            |v| v["event"] == name && device.is_none_or(|d| v["data"]["device"] == d),
            timeout,
        )
    }
}
