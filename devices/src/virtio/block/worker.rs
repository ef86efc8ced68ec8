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
//!
//! The thread stops on a pause (the VM is paused, saved or migrated): it finishes and publishes
//! the request it is serving, with its interrupt, and hands back its queues as they are
//! ([`Parked`]); the chains still available stay in the rings for the thread that resumes
//! them, here or on the destination of a migration.
//!
//! The thread stops on a reset, publishing nothing more, and on a surprise removal with
//! [`InFlightPolicy::Drop`], publishing nothing more and counting the chains it leaves behind
//! ([`Mode`]). A surprise removal with [`InFlightPolicy::Fail`] does not stop it: it completes
//! every request it holds with `VIRTIO_BLK_S_IOERR` (the one whose host I/O was running too,
//! whatever that I/O did), lets go of the backend, and from then on fails every chain the
//! driver makes available, until the driver resets the device. A driver does not learn at
//! once that its device is gone: Linux's virtio_blk goes on submitting requests until its
//! removal path breaks the virtqueues, and waits in `del_gendisk` for every request it
//! submitted — failing them is what lets it finish.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use log::{debug, error, info, warn};
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::GuestAddressSpace;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::executor::{Completion, RequestProcessor};
use crate::virtio::GuestRam;
use crate::virtio::{
    ActiveQueue, GuestMemory, InFlightPolicy, VirtioInterrupt, VirtioInterruptType,
};

/// epoll token of the stop event (queue tokens are their position in the queue list).
const STOP_TOKEN: u64 = u64::MAX;

/// How long a surprise removal waits for the request the thread is serving (its host I/O)
/// before leaving the thread to finish it alone. Host I/O on a dead network backend can block
/// for minutes; the control socket must not.
pub(super) const PULL_WAIT: Duration = Duration::from_millis(500);

/// What the thread is told to do, in one atomic the thread reads before each chain and
/// before publishing each completion.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum Mode {
    /// Serve the queues.
    Run = 0,
    /// Device reset: stop, publish nothing more (the driver may free the rings right after).
    Reset = 1,
    /// Surprise removal, [`InFlightPolicy::Fail`]: complete every available chain with an I/O
    /// error, raise the interrupts, and go on doing so for every chain the driver makes
    /// available until a reset.
    Fail = 2,
    /// Surprise removal, [`InFlightPolicy::Drop`]: stop, publish nothing more, count what is
    /// left behind.
    Drop = 3,
    /// Pause while serving: finish and publish the chain being served, then hand the queues
    /// back.
    Pause = 4,
    /// Pause while failing (after a pull with [`InFlightPolicy::Fail`]): the same, failing the
    /// chain in hand.
    PauseFailing = 5,
}

impl Mode {
    fn load(mode: &AtomicU8) -> Mode {
        match mode.load(Ordering::Acquire) {
            0 => Mode::Run,
            1 => Mode::Reset,
            2 => Mode::Fail,
            3 => Mode::Drop,
            4 => Mode::Pause,
            _ => Mode::PauseFailing,
        }
    }
}

/// Everything the I/O thread owns while the device is active.
pub(super) struct WorkerContext {
    /// The thread fails every chain instead of serving it (a device pulled out with
    /// [`InFlightPolicy::Fail`], resumed).
    pub failing: bool,
    pub memory: GuestMemory,
    pub interrupt: Arc<dyn VirtioInterrupt>,
    pub queues: Vec<ActiveQueue>,
    pub processor: RequestProcessor,
    pub needs_reset: Arc<AtomicBool>,
}

/// What a paused thread handed back: its context with the queues as it left them (the
/// request it was serving finished and published), and which queues it had given up on.
pub(super) struct Parked {
    pub ctx: WorkerContext,
    pub broken: Vec<bool>,
}

/// Handle on a running I/O thread.
pub(super) struct Worker {
    mode: Arc<AtomicU8>,
    stop_event: EventFd,
    thread: JoinHandle<Option<Parked>>,
    /// Disconnected when the thread has ended (its sender is dropped on the way out).
    exited: mpsc::Receiver<()>,
    /// Receives once the thread, told to fail the requests in flight, has failed every chain
    /// available and let go of the backend.
    failed_all: mpsc::Receiver<()>,
}

/// What [`Worker::pull`] left behind.
pub(super) enum Pulled {
    /// The thread has ended.
    Ended,
    /// The thread failed every request in flight, released the backend, and goes on failing
    /// every chain the driver makes available until [`Worker::stop`] (the driver's reset).
    Failing(Worker),
    /// The host I/O in progress outlasted [`PULL_WAIT`]: the thread finishes it alone,
    /// publishing nothing, releases the backend and ends.
    HostIoPending,
}

impl Worker {
    /// Starts the thread `name` serving `ctx` (failing every chain if `ctx.failing`).
    pub fn spawn(name: String, ctx: WorkerContext) -> io::Result<Worker> {
        let broken = vec![false; ctx.queues.len()];
        Self::start(name, ctx, broken)
    }

    /// Starts the thread `name` again where a paused one stopped.
    pub fn resume(name: String, parked: Parked) -> io::Result<Worker> {
        Self::start(name, parked.ctx, parked.broken)
    }

    fn start(name: String, ctx: WorkerContext, broken: Vec<bool>) -> io::Result<Worker> {
        let stop_event = EventFd::new(EFD_NONBLOCK)?;
        let thread_stop = stop_event.try_clone()?;
        let first = if ctx.failing { Mode::Fail } else { Mode::Run };
        let mode = Arc::new(AtomicU8::new(first as u8));
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
        let (exit_tx, exited) = mpsc::channel::<()>();
        let (failed_tx, failed_all) = mpsc::channel::<()>();
        let thread_mode = mode.clone();
        let thread = thread::Builder::new().name(name).spawn(move || {
            let _exit = exit_tx;
            let events = Events {
                epoll,
                stop: thread_stop,
                failed_all: failed_tx,
            };
            run(events, ctx, broken, &thread_mode)
        })?;
        Ok(Worker {
            mode,
            stop_event,
            thread,
            exited,
            failed_all,
        })
    }

    fn signal(&self, mode: Mode) {
        self.mode.store(mode as u8, Ordering::Release);
        if let Err(e) = self.stop_event.write(1) {
            error!("virtio-blk: cannot signal I/O thread to stop: {e}");
        }
    }

    /// Pauses the thread and waits for it: the request being served finishes and is published
    /// (with its interrupt if the driver wants one), then the thread hands back its queues.
    /// `None` if the thread had already ended (it could not go on; see the log).
    pub fn pause(self) -> Option<Parked> {
        let failing = Mode::load(&self.mode) == Mode::Fail;
        self.signal(if failing {
            Mode::PauseFailing
        } else {
            Mode::Pause
        });
        match self.thread.join() {
            Ok(parked) => parked,
            Err(_) => {
                error!("virtio-blk: I/O thread panicked");
                None
            }
        }
    }

    /// Stops the thread and waits for it (device reset): when this returns, the device no
    /// longer touches guest memory. The request being served finishes its host I/O but its
    /// completion is not published, nor anything else: the driver resetting the device may
    /// free the rings as soon as it reads the status back.
    pub fn stop(self) {
        self.signal(Mode::Reset);
        if self.thread.join().is_err() {
            error!("virtio-blk: I/O thread panicked");
        }
    }

    /// Tells the thread the device is pulled out, dealing with the requests in flight as
    /// `in_flight` says, and waits up to [`PULL_WAIT`] for the request being served. With
    /// [`InFlightPolicy::Drop`] the thread ends; with [`InFlightPolicy::Fail`] it goes on
    /// failing requests ([`Pulled::Failing`]). If the host I/O takes longer the thread is left
    /// to finish it alone, publishing nothing, and releases the backend (its reference to the
    /// disk) when it ends.
    pub fn pull(self, in_flight: InFlightPolicy) -> Pulled {
        self.signal(match in_flight {
            InFlightPolicy::Fail => Mode::Fail,
            InFlightPolicy::Drop => Mode::Drop,
        });
        let waited = match in_flight {
            InFlightPolicy::Fail => self.failed_all.recv_timeout(PULL_WAIT),
            InFlightPolicy::Drop => self.exited.recv_timeout(PULL_WAIT),
        };
        match (in_flight, waited) {
            (InFlightPolicy::Fail, Ok(())) => Pulled::Failing(self),
            (_, Err(RecvTimeoutError::Disconnected)) | (InFlightPolicy::Drop, Ok(())) => {
                if self.thread.join().is_err() {
                    error!("virtio-blk: I/O thread panicked");
                }
                Pulled::Ended
            }
            (_, Err(RecvTimeoutError::Timeout)) => {
                // From here on the thread publishes nothing, whatever the policy.
                self.mode.store(Mode::Drop as u8, Ordering::Release);
                warn!(
                    "virtio-blk: host I/O still in flight {} ms after the surprise removal; its I/O thread finishes it alone and then releases the backend",
                    PULL_WAIT.as_millis()
                );
                Pulled::HostIoPending
            }
        }
    }
}

/// What the thread waits on, and how it tells [`Worker::pull`] it has failed everything.
struct Events {
    epoll: Epoll,
    /// The stop event (a clone of the handle's): drained once the thread goes on failing.
    stop: EventFd,
    failed_all: mpsc::Sender<()>,
}

/// Per-queue state of the thread.
struct QueueState {
    active: ActiveQueue,
    broken: bool,
}

fn run(events: Events, ctx: WorkerContext, broken: Vec<bool>, mode: &AtomicU8) -> Option<Parked> {
    let WorkerContext {
        failing,
        memory,
        interrupt,
        queues,
        mut processor,
        needs_reset,
    } = ctx;
    let mut queues: Vec<QueueState> = queues
        .into_iter()
        .zip(broken.into_iter().chain(std::iter::repeat(false)))
        .map(|(active, broken)| QueueState { active, broken })
        .collect();
    let io = Io {
        memory: &memory,
        interrupt: interrupt.as_ref(),
        needs_reset: &needs_reset,
        mode,
    };
    // The driver may have queued requests before its first notification reached us (or
    // before the pause that this thread resumes from).
    for q in queues.iter_mut() {
        io.serve(q, &mut processor);
    }
    let parked = |queues: Vec<QueueState>, processor: RequestProcessor, failing: bool| {
        let (queues, broken) = queues.into_iter().map(|q| (q.active, q.broken)).unzip();
        Some(Parked {
            ctx: WorkerContext {
                failing,
                memory: memory.clone(),
                interrupt: interrupt.clone(),
                queues,
                processor,
                needs_reset: needs_reset.clone(),
            },
            broken,
        })
    };
    if !failing && !serve_notified(&events.epoll, &mut queues, &io, &mut processor, Mode::Run) {
        return None;
    }
    match Mode::load(mode) {
        Mode::Pause => return parked(queues, processor, false),
        // Serving in Fail mode completes every available chain with an error.
        Mode::Fail => {
            if !failing {
                for q in queues.iter_mut() {
                    io.serve(q, &mut processor);
                }
                // A pull that gave up waiting turned Fail into Drop meanwhile: end.
                if Mode::load(mode) != Mode::Fail {
                    return None;
                }
                processor.release_backend();
                let _ = events.failed_all.send(());
                // The stop event woke us; only the next one (the reset) is to end the loop.
                let _ = events.stop.read();
            }
            let before = processor.failed_on_removal();
            serve_notified(&events.epoll, &mut queues, &io, &mut processor, Mode::Fail);
            if Mode::load(mode) == Mode::PauseFailing {
                return parked(queues, processor, true);
            }
            info!(
                "virtio-blk: pulled-out device reset; it failed {} request(s) submitted after the pull",
                processor.failed_on_removal() - before
            );
        }
        Mode::Drop => {
            let guard = memory.memory();
            let left: u64 = queues
                .iter()
                .filter(|q| !q.broken && q.active.queue.ready())
                .filter_map(|q| {
                    let avail = q.active.queue.avail_idx(&*guard, Ordering::Acquire).ok()?;
                    Some(u64::from(avail.0.wrapping_sub(q.active.queue.next_avail())))
                })
                .sum();
            processor.count_dropped(left);
        }
        Mode::Run | Mode::Reset | Mode::PauseFailing => {}
    }
    None
}

/// Serves each queue that is notified, as long as the mode stays `mode`. Returns false if
/// the thread cannot go on (epoll failed).
fn serve_notified(
    epoll: &Epoll,
    queues: &mut [QueueState],
    io: &Io,
    processor: &mut RequestProcessor,
    mode: Mode,
) -> bool {
    let mut events = vec![EpollEvent::default(); queues.len() + 1];
    while Mode::load(io.mode) == mode {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                error!("virtio-blk: epoll_wait failed, I/O thread exits: {e}");
                return false;
            }
        };
        for ev in &events[..n] {
            let token = ev.data();
            if token == STOP_TOKEN {
                break;
            }
            let Some(q) = usize::try_from(token).ok().and_then(|i| queues.get_mut(i)) else {
                continue;
            };
            // Drain the counter; a spurious wake-up (EAGAIN) is harmless.
            let _ = q.active.notify.read();
            io.serve(q, processor);
        }
    }
    true
}

struct Io<'a> {
    memory: &'a GuestMemory,
    interrupt: &'a dyn VirtioInterrupt,
    needs_reset: &'a AtomicBool,
    mode: &'a AtomicU8,
}

impl Io<'_> {
    fn serve(&self, q: &mut QueueState, processor: &mut RequestProcessor) {
        if q.broken {
            return;
        }
        let guard = self.memory.memory();
        let mem: &GuestRam = &guard;
        match drain(mem, &mut q.active, processor, self.mode) {
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
/// runs as long as the driver keeps publishing chains. `mode` is read before each chain (in
/// Fail mode chains are failed rather than served) and again before each completion is
/// published (a reset or a Drop that came while the host I/O ran publishes nothing). A pause
/// lets the chain in hand finish as the mode before it would have (served, or failed), then
/// stops the drain, leaving the other chains available.
fn drain(
    mem: &GuestRam,
    active: &mut ActiveQueue,
    processor: &mut RequestProcessor,
    mode: &AtomicU8,
) -> Result<bool, virtio_queue::Error> {
    let queue = &mut active.queue;
    if !queue.ready() {
        // Not enabled by the driver: nothing to serve, and not an error.
        return Ok(false);
    }
    let mut used_any = false;
    'drain: loop {
        queue.disable_notification(mem)?;
        while let Some(chain) = queue.iter(mem)?.next() {
            let head = chain.head_index();
            let len = match Mode::load(mode) {
                // A pull or reset that comes while the host I/O runs decides its completion.
                Mode::Run | Mode::Pause => {
                    processor.process_then(chain, || match Mode::load(mode) {
                        Mode::Run | Mode::Pause | Mode::PauseFailing => Completion::Publish,
                        Mode::Fail => Completion::Fail,
                        Mode::Reset | Mode::Drop => Completion::Discard,
                    })
                }
                Mode::Fail | Mode::PauseFailing => Some(processor.fail(chain)),
                Mode::Reset | Mode::Drop => return Ok(false),
            };
            let len = match (Mode::load(mode), len) {
                (Mode::Reset, _) => return Ok(false),
                (Mode::Drop, _) | (_, None) => {
                    processor.count_dropped(1);
                    return Ok(false);
                }
                (Mode::Run | Mode::Fail | Mode::Pause | Mode::PauseFailing, Some(len)) => len,
            };
            queue.add_used(mem, head, len)?;
            used_any = true;
            if matches!(Mode::load(mode), Mode::Pause | Mode::PauseFailing) {
                break 'drain;
            }
        }
        if !queue.enable_notification(mem)? {
            break;
        }
        debug!("virtio-blk: queue {} refilled while draining", active.index);
    }
    Ok(used_any && queue.needs_notification(mem)?)
}
