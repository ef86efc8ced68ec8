//! The I/O thread of a virtio-blk device.
//!
//! One thread per device serves all of its queues: it sleeps in `epoll_wait` on the queues'
//! notification events and a stop event, and on a notification drains that queue — pops every
//! available chain, serves it synchronously (`pread`/`pwrite` on the backing file), adds it to
//! the used ring — then raises the queue's interrupt if the driver wants one
//! (VIRTIO_RING_F_EVENT_IDX, §2.7.10). Notifications stay suppressed while the queue is being
//! drained.
//!
//! A queue the device cannot keep serving — the driver published more chains than the queue
//! holds, a head index outside the table, a used ring the device cannot write — is a driver
//! bug the device cannot report per request: it stops serving that queue, sets
//! DEVICE_NEEDS_RESET (§2.1.2) and raises a configuration-change interrupt.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};

use log::{debug, error, warn};
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemoryMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::executor::RequestProcessor;
use crate::virtio::{ActiveQueue, GuestMemory, VirtioInterrupt, VirtioInterruptType};

/// epoll token of the stop event (queue tokens are their position in the queue list).
const STOP_TOKEN: u64 = u64::MAX;

/// Everything the I/O thread owns while the device is active.
pub(super) struct WorkerContext {
    pub memory: GuestMemory,
    pub interrupt: Arc<dyn VirtioInterrupt>,
    pub queues: Vec<ActiveQueue>,
    pub processor: RequestProcessor,
    pub needs_reset: Arc<AtomicBool>,
}

/// Handle on a running I/O thread.
pub(super) struct Worker {
    stop_flag: Arc<AtomicBool>,
    stop_event: EventFd,
    thread: JoinHandle<()>,
}

impl Worker {
    /// Starts the thread `name` serving `ctx`.
    pub fn spawn(name: String, ctx: WorkerContext) -> io::Result<Worker> {
        let stop_event = EventFd::new(EFD_NONBLOCK)?;
        let stop_flag = Arc::new(AtomicBool::new(false));
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            std::os::unix::io::AsRawFd::as_raw_fd(&stop_event),
            EpollEvent::new(EventSet::IN, STOP_TOKEN),
        )?;
        for (i, q) in ctx.queues.iter().enumerate() {
            epoll.ctl(
                ControlOperation::Add,
                std::os::unix::io::AsRawFd::as_raw_fd(q.notify.as_ref()),
                EpollEvent::new(EventSet::IN, i as u64),
            )?;
        }
        let flag = stop_flag.clone();
        let thread = thread::Builder::new()
            .name(name)
            .spawn(move || run(epoll, ctx, &flag))?;
        Ok(Worker {
            stop_flag,
            stop_event,
            thread,
        })
    }

    /// Stops the thread and waits for it: when this returns, the device no longer touches guest
    /// memory. A request being served is finished first; chains popped but not yet served are
    /// dropped (the driver is resetting the device anyway).
    pub fn stop(self) {
        self.stop_flag.store(true, Ordering::Release);
        if let Err(e) = self.stop_event.write(1) {
            error!("virtio-blk: cannot signal I/O thread to stop: {e}");
        }
        if self.thread.join().is_err() {
            error!("virtio-blk: I/O thread panicked");
        }
    }
}

/// Per-queue state of the thread.
struct QueueState {
    active: ActiveQueue,
    broken: bool,
}

fn run(epoll: Epoll, ctx: WorkerContext, stop: &AtomicBool) {
    let WorkerContext {
        memory,
        interrupt,
        queues,
        mut processor,
        needs_reset,
    } = ctx;
    let mut queues: Vec<QueueState> = queues
        .into_iter()
        .map(|active| QueueState {
            active,
            broken: false,
        })
        .collect();
    let io = Io {
        memory: &memory,
        interrupt: interrupt.as_ref(),
        needs_reset: &needs_reset,
        stop,
    };
    // The driver may have queued requests before its first notification reached us.
    for q in queues.iter_mut() {
        io.serve(q, &mut processor);
    }
    let mut events = vec![EpollEvent::default(); queues.len() + 1];
    loop {
        if stop.load(Ordering::Acquire) {
            return;
        }
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                error!("virtio-blk: epoll_wait failed, I/O thread exits: {e}");
                return;
            }
        };
        for ev in &events[..n] {
            let token = ev.data();
            if token == STOP_TOKEN {
                return;
            }
            let Some(q) = usize::try_from(token).ok().and_then(|i| queues.get_mut(i)) else {
                continue;
            };
            // Drain the counter; a spurious wake-up (EAGAIN) is harmless.
            let _ = q.active.notify.read();
            io.serve(q, &mut processor);
        }
    }
}

struct Io<'a> {
    memory: &'a GuestMemory,
    interrupt: &'a dyn VirtioInterrupt,
    needs_reset: &'a AtomicBool,
    stop: &'a AtomicBool,
}

impl Io<'_> {
    fn serve(&self, q: &mut QueueState, processor: &mut RequestProcessor) {
        if q.broken {
            return;
        }
        let guard = self.memory.memory();
        let mem: &GuestMemoryMmap = &guard;
        match drain(mem, &mut q.active, processor, self.stop) {
            Ok(true) => {
                if let Err(e) = self
                    .interrupt
                    .trigger(VirtioInterruptType::Queue(q.active.index))
                {
                    warn!("virtio-blk: queue {} interrupt failed: {e}", q.active.index);
                }
            }
            Ok(false) => {}
            Err(fault) => {
                error!(
                    "virtio-blk: queue {} unusable ({fault:?}): device needs reset",
                    q.active.index
                );
                q.broken = true;
                self.needs_reset.store(true, Ordering::Release);
                if let Err(e) = self.interrupt.trigger(VirtioInterruptType::Config) {
                    warn!("virtio-blk: config interrupt failed: {e}");
                }
            }
        }
    }
}

/// Serves every available chain of `active`; returns whether the driver must be notified.
///
/// Each pop re-reads the avail index; `iter` refuses one more than a queue size ahead of the
/// device, so a corrupt index is a fault rather than a long walk over stale entries. The loop
/// runs as long as the driver keeps publishing chains, checking `stop` before each one.
fn drain(
    mem: &GuestMemoryMmap,
    active: &mut ActiveQueue,
    processor: &mut RequestProcessor,
    stop: &AtomicBool,
) -> Result<bool, virtio_queue::Error> {
    let queue = &mut active.queue;
    if !queue.ready() {
        // Not enabled by the driver: nothing to serve, and not an error.
        return Ok(false);
    }
    let mut used_any = false;
    loop {
        queue.disable_notification(mem)?;
        while let Some(chain) = queue.iter(mem)?.next() {
            if stop.load(Ordering::Acquire) {
                return Ok(false);
            }
            let head = chain.head_index();
            let len = processor.process(chain);
            queue.add_used(mem, head, len)?;
            used_any = true;
        }
        if !queue.enable_notification(mem)? {
            break;
        }
        debug!("virtio-blk: queue {} refilled while draining", active.index);
    }
    Ok(used_any && queue.needs_notification(mem)?)
}
