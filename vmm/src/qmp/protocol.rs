//! The QMP wire protocol, free of I/O: splitting the byte stream into messages, validating
//! requests, the built-in commands, replies and events. Errors and their wordings follow QEMU
//! (`qapi/qmp-dispatch.c`, `monitor/qmp.c`, the QAPI input visitor) so that clients written
//! against QEMU see the same behaviour.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value};

/// The longest message a client may send; anything longer is answered with an error and
/// discarded up to its end, never buffered.
pub const MAX_MESSAGE_SIZE: usize = 1 << 20;

/// The QEMU version the server claims: clients use it to decide which commands exist.
pub const QEMU_VERSION: (u64, u64, u64) = (8, 2, 0);
/// The `package` member of the version.
pub const PACKAGE: &str = "hotplug-vmm";

/// Commands the protocol layer answers itself, whatever the handler.
pub const BUILTIN_COMMANDS: &[&str] = &["qmp_capabilities", "query-commands", "query-version"];

/// QAPI's `QapiErrorClass`: the `class` member of an error reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorClass {
    GenericError,
    CommandNotFound,
    DeviceNotFound,
}

impl ErrorClass {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::GenericError => "GenericError",
            ErrorClass::CommandNotFound => "CommandNotFound",
            ErrorClass::DeviceNotFound => "DeviceNotFound",
        }
    }
}

impl std::fmt::Display for ErrorClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A command's failure, sent to the client as `{"error": {"class": ..., "desc": ...}}`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{class}: {desc}")]
pub struct QmpError {
    pub class: ErrorClass,
    pub desc: String,
}

impl QmpError {
    pub fn new(class: ErrorClass, desc: impl Into<String>) -> Self {
        QmpError {
            class,
            desc: desc.into(),
        }
    }

    /// The usual error: `GenericError`.
    pub fn generic(desc: impl Into<String>) -> Self {
        Self::new(ErrorClass::GenericError, desc)
    }

    /// What a handler answers for a command it does not know (QEMU's wording).
    pub fn command_not_found(command: &str) -> Self {
        Self::new(
            ErrorClass::CommandNotFound,
            format!("The command {command} has not been found"),
        )
    }

    /// An unknown device id, as QEMU's `device_del` reports it.
    pub fn device_not_found(id: &str) -> Self {
        Self::new(
            ErrorClass::DeviceNotFound,
            format!("Device '{id}' not found"),
        )
    }

    /// The error object: `{"class": ..., "desc": ...}`.
    pub fn to_json(&self) -> Value {
        json!({"class": self.class.as_str(), "desc": self.desc})
    }
}

/// What runs the commands that are not built in. Called from the client threads, possibly from
/// several at once.
pub trait QmpHandler: Send + Sync {
    /// Runs `command`. An unknown command should give [`QmpError::command_not_found`].
    /// `Value::Null` is sent as `{}`, as QEMU does for commands that return nothing.
    fn execute(&self, command: &str, args: &Map<String, Value>) -> Result<Value, QmpError>;

    /// The commands `execute` knows, for `query-commands`.
    fn commands(&self) -> Vec<String> {
        Vec::new()
    }
}

// ---------------------------------------------------------------------------------------------
// Framing

/// One unit out of the byte stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// The bytes of one JSON value (or of something that failed to be one).
    Message(Vec<u8>),
    /// A message longer than [`MAX_MESSAGE_SIZE`]; its bytes were dropped.
    TooLong,
}

/// How many bytes of re-parsing one message may cost (see [`Framer::push`]).
const CHECK_BUDGET: usize = 8 * MAX_MESSAGE_SIZE;

/// Splits the stream into JSON values the way QEMU's JSON streamer does: a value ends where its
/// outermost brace or bracket closes (clients such as `qemu.qmp` send no newline after a
/// command), a top-level scalar ends at whitespace. On top of that, so that a client typing
/// newline-separated commands gets an answer to a broken line instead of silence, a newline
/// inside an unfinished value ends it when what came before can no longer become valid JSON.
/// Memory is bounded by [`MAX_MESSAGE_SIZE`].
pub struct Framer {
    buf: Vec<u8>,
    /// Whether a message has begun (also while discarding, when `buf` stays empty).
    started: bool,
    depth: usize,
    in_string: bool,
    escape: bool,
    /// Dropping the rest of an over-long message, up to its end or the next newline.
    discarding: bool,
    check_budget: usize,
}

impl Default for Framer {
    fn default() -> Self {
        Self::new()
    }
}

impl Framer {
    pub fn new() -> Self {
        Framer {
            buf: Vec::new(),
            started: false,
            depth: 0,
            in_string: false,
            escape: false,
            discarding: false,
            check_budget: CHECK_BUDGET,
        }
    }

    /// Whether a message is partly received (for logging a client that leaves mid-message).
    pub fn is_partial(&self) -> bool {
        self.started
    }

    /// Feeds bytes; the complete frames go to `out`.
    pub fn push(&mut self, data: &[u8], out: &mut Vec<Frame>) {
        for &b in data {
            self.push_byte(b, out);
        }
    }

    fn push_byte(&mut self, b: u8, out: &mut Vec<Frame>) {
        if self.discarding && b == b'\n' {
            self.reset();
            return;
        }
        if self.in_string {
            if b == b'\n' {
                // JSON strings cannot hold a raw newline: the message is broken, end it here.
                self.finish(out);
                return;
            }
            self.append(b, out);
            if self.escape {
                self.escape = false;
            } else if b == b'\\' {
                self.escape = true;
            } else if b == b'"' {
                self.in_string = false;
                if self.depth == 0 {
                    self.finish(out);
                }
            }
            return;
        }
        match b {
            b' ' | b'\t' | b'\r' | b'\n' => {
                if !self.started {
                    return;
                }
                if self.depth == 0 {
                    // The end of a top-level scalar (which is no valid command, but an answer
                    // is due).
                    self.finish(out);
                } else if b == b'\n' && self.broken_so_far() {
                    self.finish(out);
                } else {
                    self.append(b, out);
                }
            }
            b'{' | b'[' => {
                if self.depth == 0 && self.started {
                    self.finish(out);
                }
                self.depth += 1;
                self.append(b, out);
            }
            b'}' | b']' => {
                self.append(b, out);
                if self.depth <= 1 {
                    self.finish(out);
                } else {
                    self.depth -= 1;
                }
            }
            b'"' => {
                if self.depth == 0 && self.started {
                    self.finish(out);
                }
                self.in_string = true;
                self.append(b, out);
            }
            _ => self.append(b, out),
        }
    }

    fn append(&mut self, b: u8, out: &mut Vec<Frame>) {
        self.started = true;
        if self.discarding {
            return;
        }
        if self.buf.len() >= MAX_MESSAGE_SIZE {
            out.push(Frame::TooLong);
            self.buf = Vec::new();
            self.discarding = true;
            return;
        }
        self.buf.push(b);
    }

    /// Whether the unfinished message already holds a syntax error (as opposed to just being
    /// incomplete). Bounded: each message may only spend [`CHECK_BUDGET`] bytes on this.
    fn broken_so_far(&mut self) -> bool {
        if self.discarding || self.buf.len() > self.check_budget {
            return false;
        }
        self.check_budget -= self.buf.len();
        match serde_json::from_slice::<Value>(&self.buf) {
            Ok(_) => false,
            Err(e) => !e.is_eof(),
        }
    }

    fn finish(&mut self, out: &mut Vec<Frame>) {
        if !self.discarding && self.started {
            out.push(Frame::Message(std::mem::take(&mut self.buf)));
        }
        self.reset();
    }

    fn reset(&mut self) {
        self.buf.clear();
        if self.buf.capacity() > 64 * 1024 {
            self.buf = Vec::new();
        }
        self.started = false;
        self.depth = 0;
        self.in_string = false;
        self.escape = false;
        self.discarding = false;
        self.check_budget = CHECK_BUDGET;
    }
}

// ---------------------------------------------------------------------------------------------
// Messages

/// A validated command.
#[derive(Clone, Debug, PartialEq)]
pub struct Request {
    pub execute: String,
    pub arguments: Map<String, Value>,
    pub id: Option<Value>,
}

/// Parses and checks one message as QEMU's `qmp_dispatch_check_obj` does (without out-of-band
/// execution, so `exec-oob` is an unexpected member). On failure, the error and the `id` to
/// echo, if one could be found.
pub fn parse_request(msg: &[u8]) -> Result<Request, (QmpError, Option<Value>)> {
    let value: Value = serde_json::from_slice(msg)
        .map_err(|e| (QmpError::generic(format!("JSON parse error, {e}")), None))?;
    let Value::Object(mut obj) = value else {
        return Err((QmpError::generic("QMP input must be a JSON object"), None));
    };
    let id = obj.remove("id");
    for (key, value) in &obj {
        let problem = match key.as_str() {
            "execute" if !value.is_string() => "QMP input member 'execute' must be a string".into(),
            "arguments" if !value.is_object() => {
                "QMP input member 'arguments' must be an object".into()
            }
            "execute" | "arguments" => continue,
            other => format!("QMP input member '{other}' is unexpected"),
        };
        return Err((QmpError::generic(problem), id));
    }
    let execute = match obj.remove("execute") {
        Some(Value::String(s)) => s,
        _ => return Err((QmpError::generic("QMP input lacks member 'execute'"), id)),
    };
    let arguments = match obj.remove("arguments") {
        Some(Value::Object(map)) => map,
        _ => Map::new(),
    };
    Ok(Request {
        execute,
        arguments,
        id,
    })
}

/// `{"return": value}`, with the `id` echoed.
pub fn return_reply(value: Value, id: Option<Value>) -> Value {
    let value = if value.is_null() { json!({}) } else { value };
    let mut reply = Map::new();
    reply.insert("return".into(), value);
    if let Some(id) = id {
        reply.insert("id".into(), id);
    }
    Value::Object(reply)
}

/// `{"error": {"class": ..., "desc": ...}}`, with the `id` echoed.
pub fn error_reply(error: &QmpError, id: Option<Value>) -> Value {
    let mut reply = Map::new();
    reply.insert("error".into(), error.to_json());
    if let Some(id) = id {
        reply.insert("id".into(), id);
    }
    Value::Object(reply)
}

/// The `version` object of the greeting and of `query-version`.
pub fn version() -> Value {
    let (major, minor, micro) = QEMU_VERSION;
    json!({"qemu": {"major": major, "minor": minor, "micro": micro}, "package": PACKAGE})
}

/// What the server sends first. No capabilities: in particular no `oob`, so clients do not
/// try to enable it.
pub fn greeting() -> Value {
    json!({"QMP": {"version": version(), "capabilities": []}})
}

/// An event; `data` is left out when it is `Value::Null`, as QEMU does for events without data.
pub fn event_message(name: &str, data: Value, time: SystemTime) -> Value {
    let since = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    let mut event = Map::new();
    event.insert("event".into(), Value::String(name.into()));
    if !data.is_null() {
        event.insert("data".into(), data);
    }
    event.insert(
        "timestamp".into(),
        json!({"seconds": since.as_secs(), "microseconds": since.subsec_micros()}),
    );
    Value::Object(event)
}

/// A message as sent: compact JSON and a newline.
pub fn to_line(message: &Value) -> Vec<u8> {
    let mut line = serde_json::to_vec(message).unwrap_or_default();
    line.push(b'\n');
    line
}

// ---------------------------------------------------------------------------------------------
// Sessions

/// One client's protocol state: capabilities negotiation, then commands.
#[derive(Debug, Default)]
pub struct Session {
    negotiated: bool,
}

impl Session {
    pub fn new() -> Self {
        Session::default()
    }

    /// Whether `qmp_capabilities` has succeeded (events go only to such clients).
    pub fn negotiated(&self) -> bool {
        self.negotiated
    }

    /// The reply to one frame. Never fails: bad input gives an error reply.
    pub fn handle(&mut self, frame: &Frame, handler: &dyn QmpHandler) -> Value {
        match frame {
            Frame::Message(msg) => self.handle_message(msg, handler),
            Frame::TooLong => error_reply(
                &QmpError::generic(format!(
                    "JSON parse error, message longer than {MAX_MESSAGE_SIZE} bytes"
                )),
                None,
            ),
        }
    }

    pub fn handle_message(&mut self, msg: &[u8], handler: &dyn QmpHandler) -> Value {
        let request = match parse_request(msg) {
            Ok(request) => request,
            Err((error, id)) => return error_reply(&error, id),
        };
        let result = self.dispatch(&request, handler);
        match result {
            Ok(value) => return_reply(value, request.id),
            Err(error) => error_reply(&error, request.id),
        }
    }

    fn dispatch(&mut self, request: &Request, handler: &dyn QmpHandler) -> Result<Value, QmpError> {
        let args = &request.arguments;
        if !self.negotiated {
            if request.execute != "qmp_capabilities" {
                return Err(QmpError::new(
                    ErrorClass::CommandNotFound,
                    "Expecting capabilities negotiation with 'qmp_capabilities'",
                ));
            }
            qmp_capabilities(args)?;
            self.negotiated = true;
            return Ok(json!({}));
        }
        match request.execute.as_str() {
            "qmp_capabilities" => Err(QmpError::new(
                ErrorClass::CommandNotFound,
                "Capabilities negotiation is already complete, command ignored",
            )),
            "query-version" => {
                check_args(args, &[])?;
                Ok(version())
            }
            "query-commands" => {
                check_args(args, &[])?;
                let mut names: Vec<String> =
                    BUILTIN_COMMANDS.iter().map(|s| s.to_string()).collect();
                names.extend(handler.commands());
                names.sort();
                names.dedup();
                Ok(Value::Array(
                    names
                        .into_iter()
                        .map(|name| json!({"name": name}))
                        .collect(),
                ))
            }
            command => catch_unwind(AssertUnwindSafe(|| handler.execute(command, args)))
                .unwrap_or_else(|_| {
                    log::error!("qmp: the handler panicked on '{command}'");
                    Err(QmpError::generic(format!(
                        "Internal error while executing '{command}'"
                    )))
                }),
        }
    }
}

/// `qmp_capabilities {"enable": [...]}`: no capability is offered, so any is refused.
fn qmp_capabilities(args: &Map<String, Value>) -> Result<(), QmpError> {
    check_args(args, &["enable"])?;
    let Some(enable) = args.get("enable") else {
        return Ok(());
    };
    let Value::Array(list) = enable else {
        return Err(invalid_type("enable", "array"));
    };
    // Every capability is refused; the first one decides the message.
    match list.first() {
        None => Ok(()),
        Some(Value::String(s)) if s == "oob" => {
            Err(QmpError::generic("Capability 'oob' not available"))
        }
        Some(Value::String(s)) => Err(QmpError::generic(format!(
            "Parameter 'enable[0]' does not accept value '{s}'"
        ))),
        Some(_) => Err(invalid_type("enable[0]", "string")),
    }
}

// ---------------------------------------------------------------------------------------------
// Arguments: commands type theirs with `super::typed`; the built-in ones take none.

fn invalid_type(name: &str, expected: &str) -> QmpError {
    QmpError::generic(format!(
        "Invalid parameter type for '{name}', expected: {expected}"
    ))
}

/// Refuses members not in `allowed` ("Parameter 'X' is unexpected"). `allowed` may hold dotted
/// paths; members of a nested object are checked when some allowed path goes into it.
pub fn check_args(args: &Map<String, Value>, allowed: &[&str]) -> Result<(), QmpError> {
    check_args_under(args, "", allowed)
}

fn check_args_under(
    args: &Map<String, Value>,
    prefix: &str,
    allowed: &[&str],
) -> Result<(), QmpError> {
    for (key, value) in args {
        let path = format!("{prefix}{key}");
        if !allowed.contains(&path.as_str()) {
            return Err(QmpError::generic(format!(
                "Parameter '{path}' is unexpected"
            )));
        }
        if let Value::Object(inner) = value {
            let inner_prefix = format!("{path}.");
            if allowed.iter().any(|a| a.starts_with(&inner_prefix)) {
                check_args_under(inner, &inner_prefix, allowed)?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fake;

    #[derive(serde::Deserialize)]
    struct NeedStr {
        name: String,
    }

    impl QmpHandler for Fake {
        fn execute(&self, command: &str, args: &Map<String, Value>) -> Result<Value, QmpError> {
            match command {
                "echo" => Ok(Value::Object(args.clone())),
                "nothing" => Ok(Value::Null),
                "need-str" => {
                    let a: NeedStr = crate::qmp::typed::parse_args(args)?;
                    Ok(json!(a.name))
                }
                "panic" => panic!("boom"),
                _ => Err(QmpError::command_not_found(command)),
            }
        }

        fn commands(&self) -> Vec<String> {
            vec!["echo".into(), "nothing".into()]
        }
    }

    fn frames(input: &[u8]) -> Vec<Frame> {
        let mut framer = Framer::new();
        let mut out = Vec::new();
        framer.push(input, &mut out);
        out
    }

    fn msgs(input: &str) -> Vec<String> {
        frames(input.as_bytes())
            .into_iter()
            .map(|f| match f {
                Frame::Message(m) => String::from_utf8(m).unwrap(),
                Frame::TooLong => "<too long>".into(),
            })
            .collect()
    }

    fn negotiated() -> Session {
        let mut s = Session::new();
        let r = s.handle_message(br#"{"execute":"qmp_capabilities"}"#, &Fake);
        assert_eq!(r, json!({"return": {}}));
        s
    }

    fn desc(reply: &Value) -> &str {
        reply["error"]["desc"].as_str().unwrap()
    }

    fn class(reply: &Value) -> &str {
        reply["error"]["class"].as_str().unwrap()
    }

    #[test]
    fn framer_splits_without_newlines() {
        // qemu.qmp sends compact JSON with no newline.
        assert_eq!(
            msgs(r#"{"execute":"a"}{"execute":"b","arguments":{"x":[1,{"y":"}"}]}}"#),
            vec![
                r#"{"execute":"a"}"#,
                r#"{"execute":"b","arguments":{"x":[1,{"y":"}"}]}}"#
            ]
        );
    }

    #[test]
    fn framer_handles_lines_strings_and_partial_input() {
        assert_eq!(
            msgs("\n\n  {\"a\": \"q\\\"}\"}\r\n"),
            vec!["{\"a\": \"q\\\"}\"}"]
        );
        // Pretty-printed input over several lines is one message.
        assert_eq!(
            msgs("{\n \"execute\":\n \"x\"\n}\n"),
            vec!["{\n \"execute\":\n \"x\"\n}"]
        );
        // Byte by byte.
        let mut framer = Framer::new();
        let mut out = Vec::new();
        for b in br#"{"execute":"a"}"# {
            assert!(out.is_empty());
            framer.push(&[*b], &mut out);
        }
        assert_eq!(out, vec![Frame::Message(br#"{"execute":"a"}"#.to_vec())]);
        assert!(!framer.is_partial());
    }

    #[test]
    fn framer_ends_broken_input() {
        // Top-level scalars and garbage end at whitespace or where a value starts.
        assert_eq!(msgs("42 true\n"), vec!["42", "true"]);
        assert_eq!(msgs("foo{\"a\":1}"), vec!["foo", "{\"a\":1}"]);
        assert_eq!(msgs("}\n"), vec!["}"]);
        assert_eq!(msgs("\"str\"\n"), vec!["\"str\""]);
        // An unclosed object that cannot become valid ends at the newline...
        assert_eq!(msgs("{not json\n{\"a\":1}"), vec!["{not json", "{\"a\":1}"]);
        // ...and so does a string with a raw newline.
        assert_eq!(msgs("{\"a\": \"b\n{}"), vec!["{\"a\": \"b", "{}"]);
        // A still-valid prefix waits for more.
        assert!(msgs("{\"execute\": \"x\"\n").is_empty());
    }

    #[test]
    fn framer_bounds_long_messages() {
        let mut framer = Framer::new();
        let mut out = Vec::new();
        framer.push(b"{\"execute\":\"", &mut out);
        let chunk = vec![b'a'; 64 * 1024];
        for _ in 0..40 {
            framer.push(&chunk, &mut out);
        }
        assert_eq!(out, vec![Frame::TooLong]);
        assert!(framer.buf.capacity() <= MAX_MESSAGE_SIZE + 1);
        framer.push(b"\"}{\"execute\":\"ok\"}", &mut out);
        assert_eq!(
            out,
            vec![
                Frame::TooLong,
                Frame::Message(br#"{"execute":"ok"}"#.to_vec())
            ]
        );
        // A newline also ends the discarding.
        let mut out = Vec::new();
        framer.push(b"{\"execute\":\"", &mut out);
        framer.push(&vec![b'x'; MAX_MESSAGE_SIZE + 10], &mut out);
        framer.push(b"{{{\n{\"execute\":\"ok\"}", &mut out);
        assert_eq!(
            out,
            vec![
                Frame::TooLong,
                Frame::Message(br#"{"execute":"ok"}"#.to_vec())
            ]
        );
    }

    #[test]
    fn greeting_shape() {
        let g = greeting();
        assert_eq!(
            g,
            json!({"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 8},
                "package": "hotplug-vmm"}, "capabilities": []}})
        );
    }

    #[test]
    fn bad_input_kinds() {
        let mut s = negotiated();
        let r = s.handle_message(b"{\"execute\": }", &Fake);
        assert_eq!(class(&r), "GenericError");
        assert!(desc(&r).starts_with("JSON parse error, "), "{r}");
        assert!(r.get("id").is_none());

        let r = s.handle_message(b"[1, 2]", &Fake);
        assert_eq!(desc(&r), "QMP input must be a JSON object");
        let r = s.handle_message(b"\"x\"", &Fake);
        assert_eq!(desc(&r), "QMP input must be a JSON object");

        let r = s.handle_message(br#"{"arguments": {}, "id": 7}"#, &Fake);
        assert_eq!(
            r,
            json!({"error": {"class": "GenericError",
                "desc": "QMP input lacks member 'execute'"}, "id": 7})
        );
        let r = s.handle_message(br#"{"execute": 1}"#, &Fake);
        assert_eq!(desc(&r), "QMP input member 'execute' must be a string");
        let r = s.handle_message(br#"{"execute": "echo", "arguments": []}"#, &Fake);
        assert_eq!(desc(&r), "QMP input member 'arguments' must be an object");
        let r = s.handle_message(br#"{"execute": "echo", "bogus": 1}"#, &Fake);
        assert_eq!(desc(&r), "QMP input member 'bogus' is unexpected");
        let r = s.handle_message(br#"{"exec-oob": "echo"}"#, &Fake);
        assert_eq!(desc(&r), "QMP input member 'exec-oob' is unexpected");

        let r = s.handle(&Frame::TooLong, &Fake);
        assert_eq!(class(&r), "GenericError");
        assert!(desc(&r).starts_with("JSON parse error"));

        let r = s.handle_message(br#"{"execute": "frobnicate", "id": "x"}"#, &Fake);
        assert_eq!(
            r,
            json!({"error": {"class": "CommandNotFound",
                "desc": "The command frobnicate has not been found"}, "id": "x"})
        );

        // The session still works.
        let r = s.handle_message(
            br#"{"execute": "echo", "arguments": {"a": 1}, "id": [1]}"#,
            &Fake,
        );
        assert_eq!(r, json!({"return": {"a": 1}, "id": [1]}));
    }

    #[test]
    fn negotiation() {
        let mut s = Session::new();
        let r = s.handle_message(br#"{"execute": "query-version", "id": 1}"#, &Fake);
        assert_eq!(
            r,
            json!({"error": {"class": "CommandNotFound",
                "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}, "id": 1})
        );
        let r = s.handle_message(br#"{"execute": "echo"}"#, &Fake);
        assert_eq!(class(&r), "CommandNotFound");
        let r = s.handle_message(
            br#"{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}"#,
            &Fake,
        );
        assert_eq!(desc(&r), "Capability 'oob' not available");
        let r = s.handle_message(
            br#"{"execute": "qmp_capabilities", "arguments": {"x": 1}}"#,
            &Fake,
        );
        assert_eq!(desc(&r), "Parameter 'x' is unexpected");
        assert!(!s.negotiated());
        let r = s.handle_message(
            br#"{"execute": "qmp_capabilities", "arguments": {"enable": []}, "id": "n"}"#,
            &Fake,
        );
        assert_eq!(r, json!({"return": {}, "id": "n"}));
        assert!(s.negotiated());
        let r = s.handle_message(br#"{"execute": "qmp_capabilities"}"#, &Fake);
        assert_eq!(
            desc(&r),
            "Capabilities negotiation is already complete, command ignored"
        );
        assert_eq!(class(&r), "CommandNotFound");
    }

    #[test]
    fn builtins_and_handler() {
        let mut s = negotiated();
        let r = s.handle_message(br#"{"execute": "query-version"}"#, &Fake);
        assert_eq!(r["return"]["qemu"]["major"], 8);
        assert_eq!(r["return"]["package"], "hotplug-vmm");
        let r = s.handle_message(br#"{"execute": "query-commands"}"#, &Fake);
        let names: Vec<&str> = r["return"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            names,
            vec![
                "echo",
                "nothing",
                "qmp_capabilities",
                "query-commands",
                "query-version"
            ]
        );
        let r = s.handle_message(br#"{"execute": "nothing"}"#, &Fake);
        assert_eq!(r, json!({"return": {}}));
        let r = s.handle_message(
            br#"{"execute": "need-str", "arguments": {"name": 3}}"#,
            &Fake,
        );
        assert_eq!(
            desc(&r),
            "Invalid parameter type for 'name', expected: string"
        );
        let r = s.handle_message(br#"{"execute": "panic", "id": 3}"#, &Fake);
        assert_eq!(class(&r), "GenericError");
        assert_eq!(r["id"], 3);
    }

    #[test]
    fn check_args_refuses_members_not_allowed() {
        let args = json!({
            "s": "x", "b": true, "n": 5, "neg": -1,
            "file": {"driver": "file", "filename": "/a"},
            "notobj": 1
        });
        let args = args.as_object().unwrap();
        let allowed = [
            "s",
            "b",
            "n",
            "neg",
            "file",
            "file.driver",
            "file.filename",
            "notobj",
        ];
        assert_eq!(check_args(args, &allowed), Ok(()));
        assert_eq!(
            check_args(args, &allowed[..4]).unwrap_err().desc,
            "Parameter 'file' is unexpected"
        );
        assert_eq!(
            check_args(
                args,
                &["s", "b", "n", "neg", "file", "file.driver", "notobj"]
            )
            .unwrap_err()
            .desc,
            "Parameter 'file.filename' is unexpected"
        );
    }

    #[test]
    fn events() {
        let t = UNIX_EPOCH + std::time::Duration::new(1_700_000_000, 123_456_789);
        assert_eq!(
            event_message("DEVICE_DELETED", json!({"device": "d1", "path": "/p"}), t),
            json!({"event": "DEVICE_DELETED", "data": {"device": "d1", "path": "/p"},
                "timestamp": {"seconds": 1_700_000_000u64, "microseconds": 123_456}})
        );
        let e = event_message("STOP", Value::Null, t);
        assert!(e.get("data").is_none());
        assert_eq!(to_line(&json!({"a": 1})), b"{\"a\":1}\n".to_vec());
    }
}
