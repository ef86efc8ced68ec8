//! Why and how the VM stops: the first reason given wins, and the main loop wakes up through an
//! eventfd. A leaf: the vCPUs, the console and the control socket ask, the main loop listens.

use std::io;
use std::sync::Mutex;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Why the VM stopped.
#[derive(Clone, Debug, PartialEq)]
pub enum VmExit {
    /// The guest powered off (ACPI S5).
    PowerOff,
    /// The guest asked for a reset; the VMM ends instead of restarting.
    Reset,
    /// The user asked the VMM to quit.
    Quit,
    /// Something the VMM cannot go on from: the message explains it.
    Fatal(String),
}

/// The first reason to stop wins; the main loop wakes up through the eventfd.
pub struct ExitSignal {
    evt: EventFd,
    reason: Mutex<Option<VmExit>>,
}

impl ExitSignal {
    /// A signal nobody has raised yet.
    pub fn new() -> io::Result<Self> {
        Ok(ExitSignal {
            evt: EventFd::new(EFD_NONBLOCK)?,
            reason: Mutex::new(None),
        })
    }

    /// Asks the VM to stop for `why` (ignored if it is already stopping).
    pub fn request(&self, why: VmExit) {
        let mut r = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        if r.is_none() {
            *r = Some(why);
        }
        let _ = self.evt.write(1);
    }

    /// Whether the VM is stopping.
    pub fn is_requested(&self) -> bool {
        self.reason().is_some()
    }

    /// Why the VM is stopping, if it is.
    pub fn reason(&self) -> Option<VmExit> {
        self.reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// Wakes the event loop when the VM is asked to stop.
pub struct ExitWatcher(pub std::sync::Arc<ExitSignal>);

impl MutEventSubscriber for ExitWatcher {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.0.evt, EventSet::IN)) {
            log::error!("cannot watch the exit event: {e:?}");
        }
    }
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.0.evt.read();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_reason_wins() {
        let s = ExitSignal::new().unwrap();
        assert!(!s.is_requested());
        s.request(VmExit::PowerOff);
        s.request(VmExit::Fatal("later".into()));
        assert_eq!(s.reason(), Some(VmExit::PowerOff));
    }
}
