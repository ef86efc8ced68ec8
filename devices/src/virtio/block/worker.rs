//! The I/O thread of a virtio-blk device.
//!
//! One thread per device serves all of its queues: it sleeps in `epoll_wait` on the queues'
//! notification events, their engines' completion events and a stop event. On a notification it
//! takes every available chain of that queue, parses it into a slot of its own (the
//! `in_flight` module) and hands its host operation to the queue's engine (io_uring, or the
//! thread pool: the `host_io` module) — all of them in one submission — without waiting for
//! any. On a completion it writes the request's status, adds it to the used ring, and frees the
//! slot: requests complete in the order the host finishes them, not the order they came
//! (Virtio 1.2 §2.7.8 allows it). Used-ring updates are batched: the interrupt is considered
//! once per wake-up, after every completion that wake-up brought, and raised only if the driver
//! wants one (VIRTIO_RING_F_EVENT_IDX, §2.7.10). Notifications stay suppressed while a queue
//! is being drained, and while it cannot take more (every slot in use, or a flush waiting for
//! the writes before it).
//!
//! A queue the device cannot keep serving — the driver published more chains than the queue
//! holds, a head index outside the table, a used ring the device cannot write — is a driver
//! bug the device cannot report per request: it stops serving that queue, sets
//! DEVICE_NEEDS_RESET (§2.1.2) and raises a configuration-change interrupt. Requests of that
//! queue already in the host finish there; nothing more is published for them.
//!
//! The thread stops on a pause (the VM is paused, saved or migrated): it takes no more chains,
//! waits for every request in flight, publishes them with their interrupts, and hands back its
//! queues ([`Parked`]) with nothing in flight — the ring indices then say everything a snapshot
//! needs. The chains still available stay in the rings for the thread that resumes them, here
//! or on the destination of a migration.
//!
//! The thread stops on a reset, and on a surprise removal with [`InFlightPolicy::Drop`], taking
//! nothing more and publishing nothing more: it waits for the host I/O in flight (the kernel
//! may be writing into guest memory) and ends; a Drop counts every request it leaves behind
//! ([`Mode`]). A surprise removal with [`InFlightPolicy::Fail`] does not stop it: it completes
//! every available chain with `VIRTIO_BLK_S_IOERR` at once, and every request in flight with
//! `VIRTIO_BLK_S_IOERR` as its host I/O ends (whatever that I/O did), lets go of the backend
//! once none is left, and from then on fails every chain the driver makes available, until the
//! driver resets the device. Meanwhile it watches, for a short while, for the driver to take
//! every completion it published, so that the removal can hand the device to the VMM to take
//! away only then ([`Worker::pull`]). A driver does not learn at once that its device is gone: Linux's
//! virtio_blk goes on submitting requests until its removal path breaks the virtqueues, and
//! waits in `del_gendisk` for every request it submitted — failing them is what lets it finish.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use log::{debug, error, info, warn};
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::GuestAddressSpace;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::executor::{Completion, RequestProcessor, Started};
use super::host_io::{EngineSource, HostResult, IoEngine};
use super::in_flight::{InFlight, IoKind};
use crate::virtio::{read_le16, used_event_address, GuestRam};
use crate::virtio::{
    ActiveQueue, GuestMemory, InFlightPolicy, VirtioInterrupt, VirtioInterruptType,
};

/// How long the thread polls its queues and engines for more work, after a wake-up that
/// brought some, before it goes to sleep in `epoll_wait`. A sleeping thread's wake-up costs
/// tens of microseconds on a host without hardware virtualization (62–74 µs for an eventfd
/// round trip between two threads here) and a few on one with it; at depth, the driver's next
/// requests and the host's next completions usually come sooner than that. The cost is this
/// much CPU at the end of each burst of I/O; an idle device sleeps.
const POLL: Duration = Duration::from_micros(50);

/// Requests submitted to the host at a time while a queue is drained: the first ones start
/// while the rest are still being parsed, rather than all waiting for the last.
const SUBMIT_BATCH: usize = 4;

/// epoll token of the stop event.
const STOP_TOKEN: u64 = u64::MAX;

/// epoll token of queue `i`'s notification event.
fn notify_token(i: usize) -> u64 {
    2 * i as u64
}

/// epoll token of queue `i`'s engine's completion event.
fn completion_token(i: usize) -> u64 {
    2 * i as u64 + 1
}

/// How long a surprise removal waits for the requests in the host (their host I/O) before
/// leaving the thread to finish them alone. Host I/O on a dead network backend can block
/// for minutes; the control socket must not.
pub(super) const PULL_WAIT: Duration = Duration::from_millis(500);

/// How long a surprise removal with [`InFlightPolicy::Fail`], once every request in flight is
/// failed, waits for the guest's driver to take the completions the device published before
/// the device vanishes (see [`Worker::pull`]).
pub(super) const COLLECT_WAIT: Duration = Duration::from_secs(1);

/// How often the thread looks whether the driver has taken the completions, while a removal
/// waits for that: the driver writes `used_event` without notifying the device.
const COLLECT_POLL_MS: i32 = 1;

/// What the thread is told to do, in one atomic the thread reads on every wake-up, before
/// taking chains and before publishing each completion.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum Mode {
    /// Serve the queues.
    Run = 0,
    /// Device reset: take and publish nothing more (the driver may free the rings right after),
    /// wait for the host I/O in flight, stop.
    Reset = 1,
    /// Surprise removal, [`InFlightPolicy::Fail`]: complete every available chain with an I/O
    /// error, raise the interrupts, and go on doing so for every chain the driver makes
    /// available until a reset.
    Fail = 2,
    /// Surprise removal, [`InFlightPolicy::Drop`]: take and publish nothing more, count what is
    /// left behind, wait for the host I/O in flight, stop.
    Drop = 3,
    /// Pause while serving: take no more chains, finish and publish the requests in flight,
    /// then hand the queues back.
    Pause = 4,
    /// Pause while failing (after a pull with [`InFlightPolicy::Fail`]): the same, failing
    /// what is in flight.
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
    /// Where each queue's engine comes from.
    pub engines: EngineSource,
}

/// What a paused thread handed back: its context with the queues as it left them (every
/// request it had taken finished and published), and which queues it had given up on.
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
    /// available and every request in the host, and let go of the backend.
    failed_all: mpsc::Receiver<()>,
    /// Receives once the thread, told to drop the requests in flight, has counted them.
    counted: mpsc::Receiver<()>,
    /// Receives once the thread, having failed everything in flight, saw the driver take every
    /// completion the device had published.
    collected: mpsc::Receiver<()>,
}

/// What [`Worker::pull`] left behind.
pub(super) enum Pulled {
    /// The thread has ended.
    Ended,
    /// The thread failed every request in flight, released the backend, and goes on failing
    /// every chain the driver makes available until [`Worker::stop`] (the driver's reset).
    /// With whether the driver took every completion before the removal returned (`None`:
    /// the removal did not wait, or the driver does not say: no `VIRTIO_RING_F_EVENT_IDX`).
    Failing(Worker, Option<bool>),
    /// The host I/O in progress outlasted [`PULL_WAIT`]: the thread finishes it alone,
    /// publishing nothing more (the requests still in the host are counted dropped), releases
    /// the backend and ends.
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
        let mut engines = Vec::with_capacity(ctx.queues.len());
        for (i, q) in ctx.queues.iter().enumerate() {
            let engine = ctx.engines.open(q.queue.size(), ctx.processor.image())?;
            epoll.ctl(
                ControlOperation::Add,
                std::os::unix::io::AsRawFd::as_raw_fd(q.notify.as_ref()),
                EpollEvent::new(EventSet::IN, notify_token(i)),
            )?;
            epoll.ctl(
                ControlOperation::Add,
                engine.completion_fd(),
                EpollEvent::new(EventSet::IN, completion_token(i)),
            )?;
            engines.push(engine);
        }
        let (exit_tx, exited) = mpsc::channel::<()>();
        let (failed_tx, failed_all) = mpsc::channel::<()>();
        let (counted_tx, counted) = mpsc::channel::<()>();
        let (collected_tx, collected) = mpsc::channel::<()>();
        let thread_mode = mode.clone();
        let thread = thread::Builder::new().name(name).spawn(move || {
            let _exit = exit_tx;
            let events = Events {
                epoll,
                stop: thread_stop,
                failed_all: failed_tx,
                counted: counted_tx,
                collected: Some(collected_tx),
            };
            run(events, ctx, engines, broken, &thread_mode)
        })?;
        Ok(Worker {
            mode,
            stop_event,
            thread,
            exited,
            failed_all,
            counted,
            collected,
        })
    }

    fn signal(&self, mode: Mode) {
        self.mode.store(mode as u8, Ordering::Release);
        if let Err(e) = self.stop_event.write(1) {
            error!("virtio-blk: cannot signal I/O thread to stop: {e}");
        }
    }

    /// Pauses the thread and waits for it: the requests in flight finish and are published
    /// (with their interrupts if the driver wants them), then the thread hands back its queues.
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
    /// longer touches guest memory. The requests in the host finish their host I/O but their
    /// completions are not published, nor anything else: the driver resetting the device may
    /// free the rings as soon as it reads the status back.
    pub fn stop(self) {
        self.signal(Mode::Reset);
        if self.thread.join().is_err() {
            error!("virtio-blk: I/O thread panicked");
        }
    }

    /// Tells the thread the device is pulled out, dealing with the requests in flight as
    /// `in_flight` says, and waits up to [`PULL_WAIT`] for the requests in the host. With
    /// [`InFlightPolicy::Drop`] the thread ends; with [`InFlightPolicy::Fail`] it goes on
    /// failing requests ([`Pulled::Failing`]). If the host I/O takes longer the thread is left
    /// to finish it alone, publishing nothing, and releases the backend (its reference to the
    /// disk) when it ends.
    ///
    /// With [`InFlightPolicy::Fail`] and `await_driver`, it then waits up to [`COLLECT_WAIT`]
    /// until the driver has taken every completion published (its `used_event` has caught up
    /// with the used index, §2.7.10), so that the caller takes the device away only then.
    /// Linux's virtio-pci (6.1, 6.12) marks the virtqueues broken as soon as its removal
    /// starts, and a completion it has not taken by then is never taken: the request, and
    /// `del_gendisk` behind it, wait forever. The driver takes them within microseconds on a
    /// quiet host; on a busy one the vCPU that should may not run for milliseconds while
    /// another runs the removal.
    pub fn pull(self, in_flight: InFlightPolicy, await_driver: bool) -> Pulled {
        self.signal(match in_flight {
            InFlightPolicy::Fail => Mode::Fail,
            InFlightPolicy::Drop => Mode::Drop,
        });
        let waited = match in_flight {
            InFlightPolicy::Fail => self.failed_all.recv_timeout(PULL_WAIT),
            InFlightPolicy::Drop => self.exited.recv_timeout(PULL_WAIT),
        };
        match (in_flight, waited) {
            (InFlightPolicy::Fail, Ok(())) => {
                let collected = await_driver
                    .then(|| match self.collected.recv_timeout(COLLECT_WAIT) {
                        Ok(()) => Some(true),
                        // The driver does not say what it took.
                        Err(RecvTimeoutError::Disconnected) => None,
                        Err(RecvTimeoutError::Timeout) => Some(false),
                    })
                    .flatten();
                Pulled::Failing(self, collected)
            }
            (_, Err(RecvTimeoutError::Disconnected)) | (InFlightPolicy::Drop, Ok(())) => {
                if self.thread.join().is_err() {
                    error!("virtio-blk: I/O thread panicked");
                }
                Pulled::Ended
            }
            (_, Err(RecvTimeoutError::Timeout)) => {
                // From here on the thread publishes nothing, whatever the policy. It never
                // blocks on host I/O (that is asynchronous), so it counts what it leaves behind
                // at once.
                self.signal(Mode::Drop);
                let _ = self.counted.recv_timeout(PULL_WAIT);
                warn!(
                    "virtio-blk: host I/O still in flight {} ms after the surprise removal; its I/O thread finishes it alone and then releases the backend",
                    PULL_WAIT.as_millis()
                );
                Pulled::HostIoPending
            }
        }
    }
}

/// Fails every chain available on queue `index` of a parked device that was pulled out and
/// [fails on notify](crate::virtio::VirtioDevice::fail_on_notify), on the caller's thread (the
/// vCPU that notified), and raises the queue's interrupt if the driver wants it. A queue the
/// device cannot use any more is given up on as the thread does.
pub(super) fn fail_available(parked: &mut Parked, index: u16) {
    let ctx = &mut parked.ctx;
    let Some(pos) = ctx.queues.iter().position(|q| q.index == index) else {
        return;
    };
    if parked.broken[pos] || !ctx.queues[pos].queue.ready() {
        return;
    }
    let guard = ctx.memory.memory();
    let mem: &GuestRam = &guard;
    let queue = &mut ctx.queues[pos].queue;
    let wants_interrupt = fail_chains(queue, mem, &mut ctx.processor)
        .and_then(|failed| Ok(failed > 0 && queue.needs_notification(mem)?));
    match wants_interrupt {
        Ok(true) => {
            if let Err(e) = ctx.interrupt.trigger(VirtioInterruptType::Queue(index)) {
                warn!("virtio-blk: queue {index} interrupt failed: {e}");
            }
        }
        Ok(false) => {}
        Err(fault) => {
            parked.broken[pos] = true;
            queue_unusable(index, fault, &ctx.needs_reset, ctx.interrupt.as_ref());
        }
    }
}

/// Completes every chain available on `queue` with `VIRTIO_BLK_S_IOERR` (pulled out,
/// [`InFlightPolicy::Fail`]), notifications off while it drains; returns how many.
fn fail_chains(
    queue: &mut virtio_queue::Queue,
    mem: &GuestRam,
    processor: &mut RequestProcessor,
) -> Result<u64, virtio_queue::Error> {
    let mut failed = 0;
    loop {
        queue.disable_notification(mem)?;
        while let Some(chain) = queue.iter(mem)?.next() {
            let head = chain.head_index();
            let len = processor.fail(chain);
            queue.add_used(mem, head, len)?;
            failed += 1;
        }
        if !queue.enable_notification(mem)? {
            return Ok(failed);
        }
    }
}

/// Queue `index` cannot be served any more (`fault`): the device needs a reset, which a
/// configuration-change interrupt tells the driver (§2.1.2).
fn queue_unusable(
    index: u16,
    fault: virtio_queue::Error,
    needs_reset: &AtomicBool,
    interrupt: &dyn VirtioInterrupt,
) {
    error!("virtio-blk: queue {index} unusable ({fault:?}): device needs reset");
    needs_reset.store(true, Ordering::Release);
    if let Err(e) = interrupt.trigger(VirtioInterruptType::Config) {
        warn!("virtio-blk: config interrupt failed: {e}");
    }
}

/// What the thread waits on, and how it tells [`Worker::pull`] it has failed everything.
struct Events {
    epoll: Epoll,
    /// The stop event (a clone of the handle's): drained on every wake-up it causes; the mode
    /// says why it was signalled.
    stop: EventFd,
    failed_all: mpsc::Sender<()>,
    counted: mpsc::Sender<()>,
    /// Taken (dropped) once sent, or once the driver turns out not to say what it took.
    collected: Option<mpsc::Sender<()>>,
}

/// Per-queue state of the thread.
struct QueueState {
    active: ActiveQueue,
    broken: bool,
    engine: Box<dyn IoEngine>,
    requests: InFlight,
    /// Used entries were added since the interrupt was last considered.
    used: bool,
}

/// What the thread does with the chains the driver makes available.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Take {
    /// Serve them.
    Serve,
    /// Complete them with `VIRTIO_BLK_S_IOERR` at once (pulled out, [`InFlightPolicy::Fail`]).
    Fail,
    /// Leave them in the ring (pausing, resetting, dropping).
    Nothing,
}

impl Mode {
    fn take(self) -> Take {
        match self {
            Mode::Run => Take::Serve,
            Mode::Fail => Take::Fail,
            Mode::Reset | Mode::Drop | Mode::Pause | Mode::PauseFailing => Take::Nothing,
        }
    }

    /// What becomes of a request whose host I/O ends now.
    fn completion(self) -> Completion {
        match self {
            Mode::Run | Mode::Pause => Completion::Publish,
            Mode::Fail | Mode::PauseFailing => Completion::Fail,
            Mode::Reset | Mode::Drop => Completion::Discard,
        }
    }
}

fn run(
    mut events: Events,
    ctx: WorkerContext,
    engines: Vec<Box<dyn IoEngine>>,
    broken: Vec<bool>,
    mode: &AtomicU8,
) -> Option<Parked> {
    let WorkerContext {
        failing,
        memory,
        interrupt,
        queues,
        processor,
        needs_reset,
        engines: source,
    } = ctx;
    // Held for the thread's life: the iovecs of requests in the host point into it.
    let guard = memory.memory();
    let mut queues: Vec<QueueState> = queues
        .into_iter()
        .zip(engines)
        .zip(broken.into_iter().chain(std::iter::repeat(false)))
        .map(|((active, engine), broken)| QueueState {
            requests: InFlight::new(active.queue.size()),
            active,
            broken,
            engine,
            used: false,
        })
        .collect();
    let largest = queues
        .iter()
        .map(|q| usize::from(q.active.queue.size()))
        .max()
        .unwrap_or(1);
    let mut io = Io {
        mem: &guard,
        interrupt: interrupt.as_ref(),
        needs_reset: &needs_reset,
        processor,
        completions: Vec::with_capacity(largest),
        // Look for work once before the first sleep: the driver may have been quick.
        worked: true,
    };
    // A thread resumed failing has nothing to announce: its backend is long gone.
    let mut failed_all_sent = failing;
    let mut failed_at_announce = io.processor.failed_on_removal();
    let mut drop_counted = false;
    // Until when the thread looks whether the driver took the completions (see Worker::pull).
    let mut collect_until: Option<Instant> = None;
    let mut ready = vec![EpollEvent::default(); 2 * queues.len() + 1];
    loop {
        let now = Mode::load(mode);
        match now {
            Mode::Drop if !drop_counted => {
                // Everything taken and not completed, and everything still available, is left
                // behind: counted now, once, whatever its host I/O does later.
                let left: u64 = queues.iter_mut().map(|q| io.abandon(q)).sum();
                io.processor.count_dropped(left);
                drop_counted = true;
                let _ = events.counted.send(());
            }
            Mode::Reset => {
                for q in queues.iter_mut() {
                    if let Some(tag) = q.requests.take_held_flush() {
                        q.requests.release(tag);
                    }
                }
            }
            Mode::Fail if !failed_all_sent => {
                for q in queues.iter_mut() {
                    io.fail_held_flush(q);
                }
            }
            _ => {}
        }
        let take = now.take();
        if take != Take::Nothing {
            for q in queues.iter_mut() {
                io.take(q, take);
            }
        }
        for q in queues.iter_mut() {
            io.signal(q);
        }
        let idle = queues.iter().all(|q| q.requests.is_idle());
        match now {
            Mode::Fail if !failed_all_sent && idle => {
                io.processor.release_backend();
                let _ = events.failed_all.send(());
                failed_all_sent = true;
                failed_at_announce = io.processor.failed_on_removal();
                collect_until = Some(Instant::now() + COLLECT_WAIT);
            }
            Mode::Pause | Mode::PauseFailing if idle => {
                let (queues, broken) = queues.into_iter().map(|q| (q.active, q.broken)).unzip();
                return Some(Parked {
                    ctx: WorkerContext {
                        failing: now == Mode::PauseFailing,
                        memory: memory.clone(),
                        interrupt: interrupt.clone(),
                        queues,
                        processor: io.processor,
                        needs_reset: needs_reset.clone(),
                        engines: source,
                    },
                    broken,
                });
            }
            Mode::Reset if idle => {
                if failed_all_sent && !failing {
                    info!(
                        "virtio-blk: pulled-out device reset; it failed {} request(s) submitted after the pull",
                        io.processor.failed_on_removal() - failed_at_announce
                    );
                }
                return None;
            }
            Mode::Drop if idle => return None,
            _ => {}
        }
        if let Some(until) = collect_until {
            match io.driver_took_all(&queues) {
                Some(false) if Instant::now() < until => {}
                Some(false) => collect_until = None,
                taken => {
                    // Taken: say so. Unknown: the sender goes, which says that.
                    let tx = events.collected.take();
                    if taken == Some(true) {
                        info!(
                            "virtio-blk: pulled out; the driver took every completion {} µs after the last request in flight failed",
                            (COLLECT_WAIT - until.saturating_duration_since(Instant::now()))
                                .as_micros()
                        );
                        if let Some(tx) = tx {
                            let _ = tx.send(());
                        }
                    }
                    collect_until = None;
                }
            }
        }
        if now == Mode::Run && io.worked && io.poll(&mut queues) {
            // Work came while polling: no sleep, no wake-up.
            for q in queues.iter_mut() {
                if q.engine.has_completions() {
                    io.reap(q, Mode::load(mode).completion());
                }
            }
            continue;
        }
        io.worked = false;
        let timeout = if collect_until.is_some() {
            COLLECT_POLL_MS
        } else {
            -1
        };
        let n = match events.epoll.wait(timeout, &mut ready) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                error!("virtio-blk: epoll_wait failed, I/O thread exits: {e}");
                return None;
            }
        };
        for ev in &ready[..n] {
            let token = ev.data();
            if token == STOP_TOKEN {
                let _ = events.stop.read();
                continue;
            }
            let Some(q) = usize::try_from(token / 2)
                .ok()
                .and_then(|i| queues.get_mut(i))
            else {
                continue;
            };
            io.worked = true;
            if token % 2 == 0 {
                // Drain the counter; the chains are taken at the top of the loop. A spurious
                // wake-up (EAGAIN) is harmless.
                let _ = q.active.notify.read();
            } else {
                io.reap(q, Mode::load(mode).completion());
            }
        }
    }
}

/// The thread's means, borrowed for its life.
struct Io<'a> {
    mem: &'a GuestRam,
    interrupt: &'a dyn VirtioInterrupt,
    needs_reset: &'a AtomicBool,
    processor: RequestProcessor,
    /// Completions reaped from an engine, before they are published (reused).
    completions: Vec<(u16, HostResult)>,
    /// The last wake-up brought work: poll a while before sleeping again.
    worked: bool,
}

impl Io<'_> {
    /// Polls every queue for [`POLL`]: true as soon as one has chains it can take or
    /// completions to publish.
    fn poll(&mut self, queues: &mut [QueueState]) -> bool {
        let deadline = Instant::now() + POLL;
        loop {
            for q in queues.iter_mut() {
                if q.broken || !q.active.queue.ready() {
                    continue;
                }
                if q.engine.has_completions() {
                    return true;
                }
                if q.requests.blocked() {
                    continue;
                }
                let avail = q.active.queue.avail_idx(self.mem, Ordering::Acquire);
                if avail.is_ok_and(|a| a.0 != q.active.queue.next_avail()) {
                    return true;
                }
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::hint::spin_loop();
        }
    }

    /// Takes every chain available on `q` as `how` says, as long as the queue can take more.
    fn take(&mut self, q: &mut QueueState, how: Take) {
        if q.broken || !q.active.queue.ready() {
            return;
        }
        let result = self.take_available(q, how);
        self.start_pushed(q);
        if let Err(fault) = result {
            self.fault(q, fault);
        }
    }

    fn take_available(&mut self, q: &mut QueueState, how: Take) -> Result<(), virtio_queue::Error> {
        let mem = self.mem;
        if how == Take::Fail {
            if fail_chains(&mut q.active.queue, mem, &mut self.processor)? > 0 {
                q.used = true;
            }
            return Ok(());
        }
        let mut pushed = 0usize;
        loop {
            q.active.queue.disable_notification(mem)?;
            loop {
                if q.requests.blocked() {
                    // Notifications stay off: completions make room and take the rest.
                    return Ok(());
                }
                let Some(chain) = q.active.queue.iter(mem)?.next() else {
                    break;
                };
                let Some(tag) = q.requests.alloc() else {
                    return Ok(());
                };
                let Some(slot) = q.requests.slot(tag) else {
                    return Ok(());
                };
                match self.processor.start(chain, slot) {
                    Started::Complete(len) => {
                        let head = slot.head;
                        q.requests.release(tag);
                        q.active.queue.add_used(mem, head, len)?;
                        q.used = true;
                    }
                    Started::HostIo => {
                        if slot.kind == IoKind::Flush && q.requests.hold_flush(tag) {
                            debug!(
                                "virtio-blk: queue {} flush waits for {} request(s)",
                                q.active.index,
                                q.requests.in_host()
                            );
                            continue;
                        }
                        self.submit(q, tag)?;
                        pushed += 1;
                        if pushed.is_multiple_of(SUBMIT_BATCH) {
                            self.start_pushed(q);
                        }
                    }
                }
            }
            if !q.active.queue.enable_notification(mem)? {
                return Ok(());
            }
            debug!(
                "virtio-blk: queue {} refilled while draining",
                q.active.index
            );
        }
    }

    /// Starts what was pushed to `q`'s engine.
    fn start_pushed(&mut self, q: &mut QueueState) {
        if let Err(e) = q.engine.submit() {
            // The operations stay queued in the engine; the next submission takes them.
            error!(
                "virtio-blk: queue {} {} submission failed: {e}",
                q.active.index,
                q.engine.name()
            );
        }
    }

    /// Hands slot `tag`'s host operation to the engine; if the engine refuses it, the request
    /// fails at once.
    fn submit(&mut self, q: &mut QueueState, tag: u16) -> Result<(), virtio_queue::Error> {
        let Some(slot) = q.requests.slot(tag) else {
            return Ok(());
        };
        // SAFETY: the slot's iovecs point into guest memory, which `self.mem` keeps mapped for
        // the thread's life; the slot is not touched again until its completion is reaped
        // (`reap`), and the thread never ends with a request in the host (it waits until
        // every queue is idle). The image's descriptor stays open: the processor holds it until
        // no request is in the host.
        match unsafe { q.engine.push(tag, slot.op()) } {
            Ok(()) => {
                q.requests.submitted();
                Ok(())
            }
            Err(e) => {
                let errno = e.raw_os_error().unwrap_or(libc::EIO);
                let len = self
                    .processor
                    .finish(self.mem, slot, Err(errno), Completion::Publish);
                let head = slot.head;
                q.requests.release(tag);
                self.publish(q, head, len)
            }
        }
    }

    /// Publishes the completions `q`'s engine has, as `completion` says.
    fn reap(&mut self, q: &mut QueueState, completion: Completion) {
        let mut done = std::mem::take(&mut self.completions);
        done.clear();
        q.engine.reap(&mut done);
        let mut result = Ok(());
        for &(tag, host) in &done {
            q.requests.returned();
            let Some(slot) = q.requests.slot(tag) else {
                error!(
                    "virtio-blk: queue {}: completion of unknown slot {tag}",
                    q.active.index
                );
                continue;
            };
            if let Ok(n) = host {
                if !slot.transferred(n) && completion == Completion::Publish {
                    // A short transfer: the rest goes back to the host.
                    if let Err(e) = self.submit(q, tag) {
                        result = Err(e);
                    }
                    continue;
                }
            }
            let len = self.processor.finish(self.mem, slot, host, completion);
            let head = slot.head;
            q.requests.release(tag);
            if result.is_ok() {
                result = self.publish(q, head, len);
            }
        }
        self.completions = done;
        // A flush held for the requests before it goes now, if they are all done.
        if let Some(tag) = q.requests.release_held_flush() {
            match completion {
                Completion::Publish => {
                    if let Err(e) = self.submit(q, tag) {
                        result = Err(e);
                    }
                }
                Completion::Fail => self.fail_slot(q, tag),
                Completion::Discard => q.requests.release(tag),
            }
        }
        if let Err(e) = q.engine.submit() {
            error!(
                "virtio-blk: queue {} resubmission failed: {e}",
                q.active.index
            );
        }
        if let Err(fault) = result {
            self.fault(q, fault);
        }
    }

    /// Adds a completion to the used ring (`None`: nothing to publish).
    fn publish(
        &mut self,
        q: &mut QueueState,
        head: u16,
        len: Option<u32>,
    ) -> Result<(), virtio_queue::Error> {
        let Some(len) = len else {
            return Ok(());
        };
        if q.broken {
            return Ok(());
        }
        q.active.queue.add_used(self.mem, head, len)?;
        q.used = true;
        Ok(())
    }

    /// A flush held for the requests before it fails with them (pulled out).
    fn fail_held_flush(&mut self, q: &mut QueueState) {
        if let Some(tag) = q.requests.take_held_flush() {
            self.fail_slot(q, tag);
        }
    }

    /// Completes the request in slot `tag`, not in the host, with `VIRTIO_BLK_S_IOERR`.
    fn fail_slot(&mut self, q: &mut QueueState, tag: u16) {
        let Some(slot) = q.requests.slot(tag) else {
            return;
        };
        let len = self.processor.fail_started(self.mem, slot);
        let head = slot.head;
        q.requests.release(tag);
        if let Err(fault) = self.publish(q, head, Some(len)) {
            self.fault(q, fault);
        }
    }

    /// Gives up on `q` (pulled out, [`InFlightPolicy::Drop`]): returns how many requests are
    /// left behind — taken and not completed, and still available.
    fn abandon(&mut self, q: &mut QueueState) -> u64 {
        let held = match q.requests.take_held_flush() {
            Some(tag) => {
                q.requests.release(tag);
                1
            }
            None => 0,
        };
        let taken = q.requests.in_host() as u64 + held;
        if q.broken || !q.active.queue.ready() {
            return taken;
        }
        let available = q
            .active
            .queue
            .avail_idx(self.mem, Ordering::Acquire)
            .map(|avail| u64::from(avail.0.wrapping_sub(q.active.queue.next_avail())))
            .unwrap_or(0);
        taken + available
    }

    /// Whether the driver has taken every completion published on every queue: its
    /// `used_event` (VIRTIO_RING_F_EVENT_IDX, §2.7.10) equals the used index. Linux writes it
    /// when it re-enables its callback after taking what it found (and 0 meanwhile). `None`
    /// if a queue in use does not have it.
    fn driver_took_all(&self, queues: &[QueueState]) -> Option<bool> {
        let mut all = true;
        for q in queues {
            let queue = &q.active.queue;
            if q.broken || !queue.ready() {
                continue;
            }
            if !queue.event_idx_enabled() {
                return None;
            }
            std::sync::atomic::fence(Ordering::Acquire);
            let used_event = used_event_address(queue.avail_ring(), queue.size())
                .and_then(|at| read_le16(self.mem, at))?;
            all &= used_event == queue.next_used();
        }
        Some(all)
    }

    /// Raises `q`'s interrupt if completions were published since the last time and the
    /// driver wants to hear of them.
    fn signal(&mut self, q: &mut QueueState) {
        if !std::mem::take(&mut q.used) || q.broken {
            return;
        }
        match q.active.queue.needs_notification(self.mem) {
            Ok(true) => {
                if let Err(e) = self
                    .interrupt
                    .trigger(VirtioInterruptType::Queue(q.active.index))
                {
                    warn!("virtio-blk: queue {} interrupt failed: {e}", q.active.index);
                }
            }
            Ok(false) => {}
            Err(fault) => self.fault(q, fault),
        }
    }

    /// `q` cannot be served any more: needs reset.
    fn fault(&mut self, q: &mut QueueState, fault: virtio_queue::Error) {
        if q.broken {
            return;
        }
        q.broken = true;
        queue_unusable(q.active.index, fault, self.needs_reset, self.interrupt);
    }
}
