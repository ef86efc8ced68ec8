//! The QMP server: a Unix socket, a thread accepting clients, and per client a reader thread
//! (parses and runs commands) and a writer thread (sends replies and events from a bounded
//! queue, so that emitting an event never waits for a client).

use std::fs;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, SystemTime};

use serde_json::Value;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::protocol::{event_message, greeting, to_line, Framer, QmpHandler, Session};

/// Messages waiting for one client. A client that lets this many pile up is dropped when the
/// next event comes, rather than buffered without end.
pub const CLIENT_QUEUE_LEN: usize = 1024;
/// Clients served at once; more are turned away.
pub const MAX_CLIENTS: usize = 64;

type Line = Arc<[u8]>;

struct Client {
    id: u64,
    negotiated: Arc<AtomicBool>,
    queue: SyncSender<Line>,
    stream: UnixStream,
}

#[derive(Default)]
struct Clients {
    next_id: u64,
    list: Vec<Client>,
}

/// A handle for sending events to the clients, cheap to clone and usable from any thread after
/// the server is gone (events then go nowhere).
#[derive(Clone, Default)]
pub struct QmpEvents {
    clients: Arc<Mutex<Clients>>,
}

impl QmpEvents {
    fn lock(&self) -> MutexGuard<'_, Clients> {
        self.clients.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends the event `name` (with `data`, or none when `Value::Null`) to every client that
    /// has negotiated capabilities. Never blocks on a client: one whose queue is full is
    /// disconnected.
    pub fn emit(&self, name: &str, data: Value) {
        if crate::trace::enabled() {
            crate::trace::record(
                "qmp-event",
                serde_json::json!({"event": name, "data": data}),
            );
        }
        let line: Line = to_line(&event_message(name, data, SystemTime::now())).into();
        log::debug!("qmp: event {}", String::from_utf8_lossy(&line).trim_end());
        self.lock().list.retain(|client| {
            if !client.negotiated.load(Ordering::Acquire) {
                return true;
            }
            match client.queue.try_send(line.clone()) {
                Ok(()) => true,
                Err(TrySendError::Full(_)) => {
                    log::warn!(
                        "qmp: client {} does not read its messages; disconnecting it",
                        client.id
                    );
                    let _ = client.stream.shutdown(std::net::Shutdown::Both);
                    false
                }
                Err(TrySendError::Disconnected(_)) => false,
            }
        });
    }

    fn remove(&self, id: u64) {
        self.lock().list.retain(|c| c.id != id);
    }

    #[cfg(test)]
    fn client_count(&self) -> usize {
        self.lock().list.len()
    }
}

/// A listening QMP socket. Dropping it stops accepting, disconnects the clients and removes the
/// socket file.
pub struct QmpServer {
    path: PathBuf,
    /// (device, inode) of the socket file we created, so that drop removes only that.
    file_id: (u64, u64),
    events: QmpEvents,
    stop: Arc<EventFd>,
    accept_thread: Option<JoinHandle<()>>,
}

impl QmpServer {
    /// Listens on `path`, sending the events emitted through `events` (a handle made before
    /// the server, e.g. for the handler itself). A stale socket file there (nobody listening)
    /// is replaced; a live one, or a path that is not a socket, is an error.
    pub fn start_with_events(
        path: impl AsRef<Path>,
        handler: Arc<dyn QmpHandler>,
        events: QmpEvents,
    ) -> io::Result<QmpServer> {
        let path = path.as_ref().to_path_buf();
        match fs::symlink_metadata(&path) {
            Ok(meta) if meta.file_type().is_socket() => {
                if UnixStream::connect(&path).is_ok() {
                    return Err(io::Error::new(
                        io::ErrorKind::AddrInUse,
                        format!("{}: a server is already listening there", path.display()),
                    ));
                }
                log::info!("qmp: replacing stale socket {}", path.display());
                fs::remove_file(&path)?;
            }
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{}: exists and is not a socket", path.display()),
                ))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let listener = UnixListener::bind(&path)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        let meta = fs::symlink_metadata(&path)?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(EventFd::new(EFD_NONBLOCK)?);
        let accept_thread = {
            let (stop, events) = (stop.clone(), events.clone());
            thread::Builder::new()
                .name("qmp-accept".into())
                .spawn(move || accept_loop(listener, &stop, &events, handler))?
        };
        log::info!("qmp: listening on {}", path.display());
        Ok(QmpServer {
            path,
            file_id: (meta.dev(), meta.ino()),
            events,
            stop,
            accept_thread: Some(accept_thread),
        })
    }
}

/// What the tests use of a running server.
#[cfg(test)]
impl QmpServer {
    /// See [`QmpEvents::emit`].
    pub fn emit(&self, name: &str, data: Value) {
        self.events.emit(name, data);
    }

    /// A handle for emitting events from elsewhere.
    pub fn events(&self) -> QmpEvents {
        self.events.clone()
    }

    /// Listens on `path` with events of its own.
    pub fn start(path: impl AsRef<Path>, handler: Arc<dyn QmpHandler>) -> io::Result<QmpServer> {
        Self::start_with_events(path, handler, QmpEvents::default())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Clients connected now.
    pub fn client_count(&self) -> usize {
        self.events.client_count()
    }
}

impl Drop for QmpServer {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(thread) = self.accept_thread.take() {
            let _ = thread.join();
        }
        for client in self.events.lock().list.drain(..) {
            let _ = client.stream.shutdown(std::net::Shutdown::Both);
        }
        if let Ok(meta) = fs::symlink_metadata(&self.path) {
            if (meta.dev(), meta.ino()) == self.file_id {
                let _ = fs::remove_file(&self.path);
            }
        }
    }
}

fn accept_loop(
    listener: UnixListener,
    stop: &EventFd,
    events: &QmpEvents,
    handler: Arc<dyn QmpHandler>,
) {
    loop {
        let mut fds = [
            libc::pollfd {
                fd: listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a valid array of two pollfds that outlives the call.
        let ret = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if ret < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            log::error!("qmp: poll: {err}; no longer accepting clients");
            return;
        }
        if fds[1].revents != 0 {
            return;
        }
        match listener.accept() {
            Ok((stream, _)) => {
                if let Err(e) = add_client(stream, events, &handler) {
                    log::warn!("qmp: cannot serve a new client: {e}");
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                // Out of file descriptors and the like: wait instead of spinning.
                log::warn!("qmp: accept: {e}");
                thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

fn add_client(
    stream: UnixStream,
    events: &QmpEvents,
    handler: &Arc<dyn QmpHandler>,
) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    let (queue, pending) = sync_channel(CLIENT_QUEUE_LEN);
    let negotiated = Arc::new(AtomicBool::new(false));
    let id = {
        let mut clients = events.lock();
        if clients.list.len() >= MAX_CLIENTS {
            return Err(io::Error::other(format!(
                "{MAX_CLIENTS} clients already connected"
            )));
        }
        let id = clients.next_id;
        clients.next_id += 1;
        clients.list.push(Client {
            id,
            negotiated: negotiated.clone(),
            queue: queue.clone(),
            stream: stream.try_clone()?,
        });
        id
    };
    let spawned = (|| {
        let writer_stream = stream.try_clone()?;
        thread::Builder::new()
            .name(format!("qmp-write-{id}"))
            .spawn(move || write_loop(writer_stream, pending))?;
        let (events, handler) = (events.clone(), handler.clone());
        thread::Builder::new()
            .name(format!("qmp-read-{id}"))
            .spawn(move || {
                read_loop(&stream, id, &queue, &negotiated, &events, &*handler);
                events.remove(id);
                log::info!("qmp: client {id} disconnected");
            })?;
        io::Result::Ok(())
    })();
    if spawned.is_err() {
        events.remove(id);
    } else {
        log::info!("qmp: client {id} connected");
    }
    spawned
}

fn read_loop(
    mut stream: &UnixStream,
    id: u64,
    queue: &SyncSender<Line>,
    negotiated: &AtomicBool,
    events: &QmpEvents,
    handler: &dyn QmpHandler,
) {
    if queue.send(to_line(&greeting()).into()).is_err() {
        return;
    }
    let mut session = Session::new();
    let mut framer = Framer::new();
    let mut buf = [0u8; 4096];
    let mut frames = Vec::new();
    loop {
        let n = match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                log::debug!("qmp: client {id}: read: {e}");
                break;
            }
        };
        framer.push(&buf[..n], &mut frames);
        for frame in frames.drain(..) {
            let was_negotiated = session.negotiated();
            let reply = session.handle(&frame, handler);
            if reply.get("error").is_some() {
                log::debug!("qmp: client {id}: {reply}");
            }
            let line: Line = to_line(&reply).into();
            if was_negotiated || !session.negotiated() {
                if queue.send(line).is_err() {
                    return;
                }
                continue;
            }
            // The reply to qmp_capabilities: from now on events are due, and none may overtake
            // the reply (qemu.qmp takes the next message for it) or be missed by a client that
            // has read the reply. So queue it and switch under the lock `emit` takes; never
            // wait there: a client with a full queue at this point is not reading at all.
            let _clients = events.lock();
            if queue.try_send(line).is_err() {
                log::warn!("qmp: client {id} does not read its messages; disconnecting it");
                return;
            }
            negotiated.store(true, Ordering::Release);
        }
    }
    if framer.is_partial() {
        log::debug!("qmp: client {id} left in the middle of a message");
    }
}

fn write_loop(mut stream: UnixStream, pending: Receiver<Line>) {
    // Ends when every sender is gone (reader finished and client unregistered) or on error.
    for line in pending {
        if let Err(e) = stream.write_all(&line) {
            log::debug!("qmp: write: {e}");
            break;
        }
    }
    let _ = stream.shutdown(std::net::Shutdown::Both);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qmp::protocol::QmpError;
    use serde_json::{json, Map};
    use std::io::{BufRead, BufReader};
    use std::sync::atomic::AtomicUsize;
    use std::sync::OnceLock;

    /// A handler standing in for the VM: a few commands, one of which emits an event.
    #[derive(Default)]
    struct Fake {
        events: OnceLock<QmpEvents>,
    }

    impl QmpHandler for Fake {
        fn execute(&self, command: &str, args: &Map<String, Value>) -> Result<Value, QmpError> {
            match command {
                "query-status" => Ok(json!({"running": true, "status": "running"})),
                "device_del" => {
                    #[derive(serde::Deserialize)]
                    struct Id {
                        id: String,
                    }
                    let Id { id } = crate::qmp::typed::parse_args(args)?;
                    if id != "disk1" {
                        return Err(QmpError::device_not_found(&id));
                    }
                    if let Some(events) = self.events.get() {
                        events.emit("DEVICE_DELETED", json!({"device": id, "path": "/x"}));
                    }
                    Ok(Value::Null)
                }
                _ => Err(QmpError::command_not_found(command)),
            }
        }

        fn commands(&self) -> Vec<String> {
            vec!["query-status".into(), "device_del".into()]
        }
    }

    fn temp_socket() -> PathBuf {
        static N: AtomicUsize = AtomicUsize::new(0);
        std::env::temp_dir().join(format!(
            "hotplug-vmm-qmp-test-{}-{}.sock",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ))
    }

    struct Conn {
        reader: BufReader<UnixStream>,
        writer: UnixStream,
    }

    impl Conn {
        fn open(path: &Path) -> Conn {
            let stream = UnixStream::connect(path).unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            Conn {
                writer: stream.try_clone().unwrap(),
                reader: BufReader::new(stream),
            }
        }

        fn recv(&mut self) -> Value {
            let mut line = String::new();
            self.reader.read_line(&mut line).unwrap();
            assert!(line.ends_with('\n'), "incomplete line {line:?}");
            serde_json::from_str(&line).unwrap()
        }

        fn send(&mut self, raw: &str) {
            self.writer.write_all(raw.as_bytes()).unwrap();
        }

        fn cmd(&mut self, raw: &str) -> Value {
            self.send(raw);
            self.recv()
        }
    }

    fn start() -> (QmpServer, Arc<Fake>) {
        let fake = Arc::new(Fake::default());
        let server = QmpServer::start(temp_socket(), fake.clone()).unwrap();
        let _ = fake.events.set(server.events());
        (server, fake)
    }

    fn wait_for(mut cond: impl FnMut() -> bool) {
        for _ in 0..500 {
            if cond() {
                return;
            }
            thread::sleep(Duration::from_millis(10));
        }
        panic!("timed out");
    }

    #[test]
    fn two_clients_end_to_end() {
        let (server, _fake) = start();
        let mut a = Conn::open(server.path());
        let mut b = Conn::open(server.path());
        for c in [&mut a, &mut b] {
            let g = c.recv();
            assert_eq!(g["QMP"]["version"]["qemu"]["major"], 8);
            assert_eq!(g["QMP"]["capabilities"], json!([]));
        }

        // Before negotiation: refused, id echoed.
        let r = a.cmd("{\"execute\": \"query-status\", \"id\": 1}\n");
        assert_eq!(r["error"]["class"], "CommandNotFound");
        assert_eq!(r["id"], 1);
        // No newline at all, as qemu.qmp sends.
        assert_eq!(
            a.cmd(r#"{"execute":"qmp_capabilities","arguments":{}}"#),
            json!({"return": {}})
        );

        // Events go only to negotiated clients: b has not negotiated yet.
        server.emit("EARLY", json!({"n": 0}));
        let r = b.cmd("{\"execute\": \"qmp_capabilities\", \"id\": \"b\"}\n");
        assert_eq!(r, json!({"return": {}, "id": "b"}));
        let e = a.recv();
        assert_eq!(e["event"], "EARLY");

        let r = a.cmd("{\"execute\": oops}\n");
        assert_eq!(r["error"]["class"], "GenericError");
        assert!(r["error"]["desc"]
            .as_str()
            .unwrap()
            .starts_with("JSON parse error, "));
        let r = a.cmd("{not json\n");
        assert_eq!(r["error"]["class"], "GenericError");
        let r = a.cmd("[]\n");
        assert_eq!(r["error"]["desc"], "QMP input must be a JSON object");
        let r = a.cmd("{\"id\": 5}\n");
        assert_eq!(r["error"]["desc"], "QMP input lacks member 'execute'");
        assert_eq!(r["id"], 5);
        let r = a.cmd("{\"execute\": \"nope\", \"id\": {\"x\": [1]}}\n");
        assert_eq!(r["error"]["class"], "CommandNotFound");
        assert_eq!(r["id"], json!({"x": [1]}));
        let r = a.cmd("{\"execute\": \"device_del\", \"arguments\": {}}\n");
        assert_eq!(r["error"]["desc"], "Parameter 'id' is missing");
        let r = a.cmd("{\"execute\": \"device_del\", \"arguments\": {\"id\": \"zz\"}}\n");
        assert_eq!(r["error"]["class"], "DeviceNotFound");

        // Still serving after all that.
        let r = a.cmd("{\"execute\": \"query-status\", \"id\": \"s\"}\n");
        assert_eq!(r["return"]["status"], "running");
        assert_eq!(r["id"], "s");

        // An event raised while a command runs reaches both clients.
        a.send("{\"execute\": \"device_del\", \"arguments\": {\"id\": \"disk1\"}, \"id\": 9}\n");
        let mut got_reply = false;
        let mut got_event = false;
        for _ in 0..2 {
            let m = a.recv();
            if m.get("event").is_some() {
                assert_eq!(m["data"]["device"], "disk1");
                assert!(m["timestamp"]["seconds"].as_u64().unwrap() > 0);
                got_event = true;
            } else {
                assert_eq!(m, json!({"return": {}, "id": 9}));
                got_reply = true;
            }
        }
        assert!(got_reply && got_event);
        let e = b.recv();
        assert_eq!(e["event"], "DEVICE_DELETED");

        // b leaves in the middle of a message; a does not notice.
        b.send("{\"execute\": \"query-");
        drop(b);
        wait_for(|| server.client_count() == 1);
        server.emit("AFTER", Value::Null);
        let e = a.recv();
        assert_eq!(e["event"], "AFTER");
        assert!(e.get("data").is_none());
        let r = a.cmd("{\"execute\": \"query-version\"}\n");
        assert_eq!(r["return"]["package"], "hotplug-vmm");

        // A third client can still come.
        let mut c = Conn::open(server.path());
        assert!(c.recv().get("QMP").is_some());

        let path = server.path().to_path_buf();
        drop(server);
        assert!(!path.exists());
        // The clients are disconnected.
        let mut line = String::new();
        assert_eq!(a.reader.read_line(&mut line).unwrap_or(0), 0);
    }

    #[test]
    fn oversized_message_is_refused_and_discarded() {
        let (server, _fake) = start();
        let mut a = Conn::open(server.path());
        a.recv();
        a.cmd("{\"execute\": \"qmp_capabilities\"}");
        let mut big = String::from("{\"execute\": \"query-status\", \"arguments\": {\"x\": \"");
        big.push_str(&"a".repeat(super::super::protocol::MAX_MESSAGE_SIZE + 100));
        big.push_str("\"}}");
        // Writing 1 MiB blocks until the server reads it: do it from another thread.
        let mut writer = a.writer.try_clone().unwrap();
        let sender = thread::spawn(move || writer.write_all(big.as_bytes()).unwrap());
        let r = a.recv();
        sender.join().unwrap();
        assert_eq!(r["error"]["class"], "GenericError");
        let r = a.cmd("{\"execute\": \"query-status\", \"id\": 2}");
        assert_eq!(r["return"]["running"], true);
        assert_eq!(r["id"], 2);
    }

    #[test]
    fn slow_client_is_dropped_without_blocking_emit() {
        let (server, _fake) = start();
        let mut slow = Conn::open(server.path());
        slow.recv();
        slow.cmd("{\"execute\": \"qmp_capabilities\"}");
        let mut fast = Conn::open(server.path());
        fast.recv();
        fast.cmd("{\"execute\": \"qmp_capabilities\"}");
        // The slow client never reads; the fast one does, on another thread.
        let big = "x".repeat(4 * 1024);
        let total = CLIENT_QUEUE_LEN * 4;
        let reader = thread::spawn(move || {
            for _ in 0..total {
                assert!(fast.recv().get("event").is_some());
            }
            fast
        });
        // An emit that waited for the slow client would never return (it never reads): the
        // emits run on a thread of their own, and not ending within a minute — however loaded
        // the machine — is that hang, reported instead of a test that never ends.
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let emitter = {
            let events = server.events();
            thread::spawn(move || {
                for i in 0..total {
                    events.emit("SPAM", json!({"i": i, "pad": big}));
                }
                done_tx.send(()).unwrap();
            })
        };
        done_rx
            .recv_timeout(Duration::from_secs(60))
            .expect("emit blocked on the client that does not read");
        emitter.join().unwrap();
        let mut fast = reader.join().unwrap();
        assert_eq!(server.client_count(), 1);
        let r = fast.cmd("{\"execute\": \"query-status\"}");
        assert!(r.get("return").is_some());
        // The slow client's socket was shut down: reading drains what was sent, then EOF.
        let mut sink = Vec::new();
        let _ = slow.reader.read_to_end(&mut sink);
    }

    #[test]
    fn socket_file_handling() {
        let path = temp_socket();
        // A regular file is not replaced.
        fs::write(&path, b"keep").unwrap();
        let err = QmpServer::start(&path, Arc::new(Fake::default()))
            .err()
            .unwrap();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(fs::read(&path).unwrap(), b"keep");
        fs::remove_file(&path).unwrap();

        // A stale socket is.
        drop(UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let server = QmpServer::start(&path, Arc::new(Fake::default())).unwrap();
        // A live one is not.
        let err = QmpServer::start(&path, Arc::new(Fake::default()))
            .err()
            .unwrap();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
        let mut c = Conn::open(&path);
        assert!(c.recv().get("QMP").is_some());
        drop(server);
        assert!(!path.exists());
    }

    /// Runs `resources/qmp_smoke.py` (the `qemu.qmp` reference client) against a test server.
    /// It needs a `python3` that imports `qemu.qmp`: `resources/test.sh` installs it and sets
    /// PYTHONPATH (HOTPLUG_VMM_PYTHON names another interpreter).
    #[test]
    fn qemu_qmp_python_client() {
        let python = std::env::var("HOTPLUG_VMM_PYTHON").unwrap_or_else(|_| "python3".into());
        let (server, _fake) = start();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../resources/qmp_smoke.py");
        let out = std::process::Command::new(python)
            .arg(script)
            .arg(server.path())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "stdout:\n{stdout}\nstderr:\n{stderr}");
        print!("{stdout}");
    }
}
