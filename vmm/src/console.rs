//! The host side of the guest console: stdin into the 16550's receive FIFO, with flow control.
//!
//! The 16550 only holds 64 received bytes, so what does not fit waits here until the guest has
//! drained the FIFO (the UART reports that through an eventfd), instead of being dropped. On a
//! terminal, `Ctrl-A x` ends the VM, as in QEMU.

use std::io::Read;
use std::os::unix::io::AsRawFd;
use std::sync::{Arc, Mutex};

use devices::serial::{DrainNotifier, SerialDevice};
use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::eventfd::EventFd;

use crate::exit::{ExitSignal, VmExit};

/// Most host input held back while the guest is not reading.
const MAX_PENDING: usize = 64 * 1024;
/// The escape key for console commands (Ctrl-A).
const ESCAPE: u8 = 0x01;

/// Signals the console's drain eventfd.
pub struct EventFdNotifier(pub EventFd);

impl DrainNotifier for EventFdNotifier {
    fn drained(&self) {
        let _ = self.0.write(1);
    }
}

/// Feeds stdin to the guest's UART.
pub struct ConsoleInput {
    serial: Arc<Mutex<SerialDevice>>,
    drained: EventFd,
    pending: Vec<u8>,
    stdin_watched: bool,
    stdin_eof: bool,
    escape_armed: bool,
    exit: Arc<ExitSignal>,
    tty: bool,
}

impl ConsoleInput {
    /// `drained` is the eventfd the UART signals through its [`DrainNotifier`].
    pub fn new(
        serial: Arc<Mutex<SerialDevice>>,
        drained: EventFd,
        exit: Arc<ExitSignal>,
        tty: bool,
    ) -> Self {
        ConsoleInput {
            serial,
            drained,
            pending: Vec::new(),
            stdin_watched: false,
            stdin_eof: false,
            escape_armed: false,
            exit,
            tty,
        }
    }

    fn push_pending(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let mut uart = self.serial.lock().unwrap_or_else(|e| e.into_inner());
        match uart.enqueue_input(&self.pending) {
            Ok(n) => {
                self.pending.drain(..n);
            }
            Err(e) => log::warn!("console input: {e}"),
        }
    }

    /// Handles console escapes on a terminal; returns the bytes meant for the guest.
    fn filter_escapes(&mut self, input: &[u8]) -> Vec<u8> {
        if !self.tty {
            return input.to_vec();
        }
        let mut out = Vec::with_capacity(input.len());
        for &b in input {
            if self.escape_armed {
                self.escape_armed = false;
                match b {
                    b'x' | b'X' => self.exit.request(VmExit::Quit),
                    ESCAPE => out.push(ESCAPE),
                    _ => {}
                }
            } else if b == ESCAPE {
                self.escape_armed = true;
            } else {
                out.push(b);
            }
        }
        out
    }

    fn set_stdin_watch(&mut self, ops: &mut EventOps, watch: bool) {
        if watch == self.stdin_watched {
            return;
        }
        let ev = Events::empty_raw(libc::STDIN_FILENO);
        let r = if watch {
            ops.add(Events::new_raw(libc::STDIN_FILENO, EventSet::IN))
        } else {
            ops.remove(ev)
        };
        match r {
            Ok(()) => self.stdin_watched = watch,
            Err(e) => {
                // epoll refuses regular files and /dev/null: such a stdin has nothing to wait for.
                log::debug!("console: stdin cannot be watched ({e:?}); no guest input");
                self.stdin_eof = true;
            }
        }
    }
}

impl MutEventSubscriber for ConsoleInput {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.drained, EventSet::IN)) {
            log::warn!("console: cannot watch the UART: {e:?}");
        }
        self.set_stdin_watch(ops, true);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.fd() == self.drained.as_raw_fd() {
            let _ = self.drained.read();
        } else if events.fd() == libc::STDIN_FILENO {
            let mut buf = [0u8; 4096];
            match std::io::stdin().lock().read(&mut buf) {
                Ok(0) => {
                    // EOF: the guest gets no more input, the VM goes on.
                    self.stdin_eof = true;
                }
                Ok(n) => {
                    let bytes = self.filter_escapes(&buf[..n]);
                    self.pending.extend_from_slice(&bytes);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    log::warn!("console: reading stdin: {e}");
                    self.stdin_eof = true;
                }
            }
        }
        self.push_pending();
        // Stop reading stdin while the guest is not keeping up, and for good after EOF.
        let want_stdin = !self.stdin_eof && self.pending.len() < MAX_PENDING;
        self.set_stdin_watch(ops, want_stdin);
    }
}
