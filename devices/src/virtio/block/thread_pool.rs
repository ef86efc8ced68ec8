//! The thread-pool engine: `preadv`/`pwritev`/`fdatasync` on worker threads, for hosts without
//! io_uring (QEMU's `aio=threads`), and the engine of qcow2 images, whose operations go
//! through `imago`'s blocking calls ([`Runner`]).
//!
//! One pool per queue, of as many threads as the queue can have requests in flight, up to
//! [`MAX_THREADS`], started with the queue and living until it stops; each runs one operation
//! at a time to its end (short transfers are repeated there), appends the completion to a list
//! and signals an eventfd. The threads, the work list and the completion list are all made up
//! front, with room for every operation the queue can have in flight: serving a request
//! allocates nothing.

use std::collections::VecDeque;
use std::io;
use std::os::unix::io::{AsRawFd, RawFd};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::host_io::{run_blocking, HostOp, HostResult, IoEngine};
use super::qcow2::Qcow2Image;

/// Most threads a queue's pool runs: the host I/O a queue can have going at once.
pub const MAX_THREADS: usize = 16;

/// What a pool thread runs an operation with.
#[derive(Clone, Debug)]
pub enum Runner {
    /// The system calls, on the file descriptor the operation names.
    File,
    /// A qcow2 image's layer, at the virtual disk's offsets the operation names.
    Qcow2(Arc<Qcow2Image>),
}

impl Runner {
    /// Runs `op` to its end.
    ///
    /// # Safety
    ///
    /// As [`IoEngine::push`].
    unsafe fn run(&self, op: HostOp) -> HostResult {
        match self {
            // SAFETY: the caller's contract.
            Runner::File => unsafe { run_blocking(op) },
            // SAFETY: the caller's contract.
            Runner::Qcow2(image) => unsafe { image.run(op) },
        }
    }
}

struct State {
    work: VecDeque<(u16, HostOp)>,
    done: Vec<(u16, HostResult)>,
    stop: bool,
}

struct Shared {
    state: Mutex<State>,
    work_ready: Condvar,
    completions: EventFd,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A worker never panics while holding the lock (it only moves plain values), but
        // should one, the lists are still consistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A pool of threads serving one queue.
pub struct ThreadPoolEngine {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl ThreadPoolEngine {
    /// A pool with room for `depth` operations in flight, running them with `runner`.
    pub fn new(depth: u16, runner: Runner) -> io::Result<Self> {
        Self::with_completions(depth, runner, EventFd::new(EFD_NONBLOCK)?)
    }

    /// [`new`](Self::new), signalling `completions` (which another engine may share).
    pub fn with_completions(depth: u16, runner: Runner, completions: EventFd) -> io::Result<Self> {
        let depth = usize::from(depth.max(1));
        let mut pool = ThreadPoolEngine {
            shared: Arc::new(Shared {
                state: Mutex::new(State {
                    work: VecDeque::with_capacity(depth),
                    done: Vec::with_capacity(depth),
                    stop: false,
                }),
                work_ready: Condvar::new(),
                completions,
            }),
            threads: Vec::new(),
        };
        for _ in 0..depth.min(MAX_THREADS) {
            let shared = pool.shared.clone();
            let runner = runner.clone();
            let handle = std::thread::Builder::new()
                .name("blk-pool".into())
                .spawn(move || work(&shared, &runner))?;
            pool.threads.push(handle);
        }
        Ok(pool)
    }
}

fn work(shared: &Shared, runner: &Runner) {
    let mut state = shared.lock();
    loop {
        let Some((tag, op)) = state.work.pop_front() else {
            if state.stop {
                return;
            }
            state = shared
                .work_ready
                .wait(state)
                .unwrap_or_else(|e| e.into_inner());
            continue;
        };
        drop(state);
        // SAFETY: the submitter keeps the iovecs and memory valid until it reaps this
        // completion (`IoEngine::push`'s contract), which it cannot before it is pushed below.
        let result = unsafe { runner.run(op) };
        state = shared.lock();
        state.done.push((tag, result));
        if let Err(e) = shared.completions.write(1) {
            log::error!("virtio-blk: cannot signal a completion: {e}");
        }
    }
}

impl IoEngine for ThreadPoolEngine {
    unsafe fn push(&mut self, tag: u16, op: HostOp) -> io::Result<()> {
        self.shared.lock().work.push_back((tag, op));
        self.shared.work_ready.notify_one();
        Ok(())
    }

    fn submit(&mut self) -> io::Result<()> {
        Ok(())
    }

    fn reap(&mut self, out: &mut Vec<(u16, HostResult)>) {
        let _ = self.shared.completions.read();
        out.append(&mut self.shared.lock().done);
    }

    fn completion_fd(&self) -> RawFd {
        self.shared.completions.as_raw_fd()
    }

    fn has_completions(&mut self) -> bool {
        !self.shared.lock().done.is_empty()
    }

    fn name(&self) -> &'static str {
        "threads"
    }
}

impl Drop for ThreadPoolEngine {
    /// Lets the threads finish what was pushed, then joins them.
    fn drop(&mut self) {
        self.shared.lock().stop = true;
        self.shared.work_ready.notify_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::block::testing::engine_runs_many_requests_at_once;

    #[test]
    fn thread_pool_runs_many_requests_at_once() {
        let mut engine = ThreadPoolEngine::new(32, Runner::File).unwrap();
        engine_runs_many_requests_at_once(&mut engine);
        assert_eq!(engine.threads.len(), MAX_THREADS);
        assert_eq!(
            ThreadPoolEngine::new(4, Runner::File)
                .unwrap()
                .threads
                .len(),
            4
        );
    }
}
