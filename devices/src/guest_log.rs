//! Rate limits on the log lines a guest can cause.
//!
//! A device model complains when the guest does something it ignores or refuses: a write to a
//! read-only configuration field, a BAR moved over another, a sleep state the DSDT does not
//! offer, a virtqueue that breaks the spec. The guest is untrusted and can do any of these in a
//! loop, millions of times a second; a log line each would flood the host's log (a hostile
//! guest writing at random into every configuration space and BAR made a WARN line per access,
//! issue 21). So every complaint a guest can trigger goes through [`report`] instead of the
//! `log` macros:
//!
//! - it is counted under its *kind* (a fixed string naming the complaint, e.g.
//!   `"virtio-blk config write"`), whether logged or not;
//! - it is logged unless its kind has already logged [`BURST`] lines in the current
//!   [`WINDOW`] (a window opens with the first line of a kind after the last one closed);
//! - the first line logged after lines were left out says how many, so the log never hides
//!   that something happened, only how often.
//!
//! The counts, per kind, are what [`counts`] returns (the VMM's `x-query-guest-log`). The
//! decision is [`RateLimit::admit`], a pure function of the kind's history and the time given
//! to it; [`report`] is the process-wide adapter that feeds it a monotonic clock. Like the `log`
//! crate's logger, the registry is one per process: a process running several VMs counts them
//! together.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Lines a kind may log per [`WINDOW`].
pub const BURST: u32 = 10;

/// How long a kind's window of [`BURST`] lines lasts.
pub const WINDOW: Duration = Duration::from_secs(60);

/// One kind's history: its window and its counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateLimit {
    /// When the current window opened (time since the clock's origin); `None` before the first
    /// line.
    window_start: Option<Duration>,
    /// Lines logged in the current window.
    in_window: u32,
    /// Lines left out since the last one logged.
    unreported: u64,
    /// Every complaint of this kind, logged or not.
    pub total: u64,
    /// The complaints of this kind that were not logged.
    pub suppressed: u64,
}

impl RateLimit {
    /// Counts one complaint at `now` and decides whether to log it: `Some(n)` to log it, `n`
    /// being how many lines of this kind were left out since the last one logged; `None` to
    /// leave it out.
    ///
    /// `now` is read from a monotonic clock; a `now` earlier than the window's start (which a
    /// monotonic clock does not give) is taken as inside the window.
    pub fn admit(&mut self, now: Duration) -> Option<u64> {
        self.total += 1;
        let expired = self
            .window_start
            .is_none_or(|start| now.saturating_sub(start) >= WINDOW);
        if expired {
            self.window_start = Some(now);
            self.in_window = 0;
        }
        if self.in_window >= BURST {
            self.suppressed += 1;
            self.unreported += 1;
            return None;
        }
        self.in_window += 1;
        Some(std::mem::take(&mut self.unreported))
    }
}

/// Every kind's history, and the clock's origin.
struct Registry {
    origin: Instant,
    kinds: Mutex<BTreeMap<&'static str, RateLimit>>,
}

fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(|| Registry {
        origin: Instant::now(),
        kinds: Mutex::new(BTreeMap::new()),
    })
}

/// Counts a complaint the guest caused and logs it at `level` unless its `kind` is over its
/// rate (see the module docs). `kind` names the complaint, not the device: the same kind from
/// two devices shares one budget.
pub fn report(kind: &'static str, level: log::Level, message: fmt::Arguments<'_>) {
    let r = registry();
    let now = r.origin.elapsed();
    let admitted = r
        .kinds
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry(kind)
        .or_default()
        .admit(now);
    match admitted {
        Some(0) => log::log!(level, "{message}"),
        Some(n) => log::log!(
            level,
            "{message} ({n} more like it not logged: {kind}, see x-query-guest-log)"
        ),
        None => {}
    }
}

/// A kind's counts, as [`counts`] reports them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KindCounts {
    /// What the guest did, as passed to [`report`].
    pub kind: &'static str,
    /// How many times, logged or not.
    pub total: u64,
    /// How many of them were not logged.
    pub suppressed: u64,
}

/// The counts of every kind reported so far in this process, by kind.
pub fn counts() -> Vec<KindCounts> {
    registry()
        .kinds
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .map(|(&kind, r)| KindCounts {
            kind,
            total: r.total,
            suppressed: r.suppressed,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64) -> Duration {
        Duration::from_secs(secs)
    }

    #[test]
    fn a_burst_is_logged_then_the_rest_of_the_window_is_counted_only() {
        let mut r = RateLimit::default();
        for _ in 0..BURST {
            assert_eq!(r.admit(at(5)), Some(0));
        }
        for _ in 0..1000 {
            assert_eq!(r.admit(at(6)), None);
        }
        assert_eq!((r.total, r.suppressed), (u64::from(BURST) + 1000, 1000));
    }

    #[test]
    fn the_first_line_of_the_next_window_says_how_many_were_left_out() {
        let mut r = RateLimit::default();
        for _ in 0..BURST + 7 {
            r.admit(at(0));
        }
        // Still the same window one tick before it closes.
        assert_eq!(r.admit(WINDOW - Duration::from_nanos(1)), None);
        assert_eq!(r.admit(WINDOW), Some(8));
        // The count was handed over once.
        assert_eq!(r.admit(WINDOW), Some(0));
        assert_eq!(r.suppressed, 8);
    }

    #[test]
    fn a_window_opens_at_the_first_line_after_a_quiet_spell() {
        let mut r = RateLimit::default();
        assert_eq!(r.admit(at(0)), Some(0));
        // Long after: a fresh window from here, so a burst right after is logged whole.
        for _ in 0..BURST {
            assert_eq!(r.admit(at(3600)), Some(0));
        }
        assert_eq!(r.admit(at(3600) + WINDOW - at(1)), None);
        assert_eq!(r.admit(at(3600) + WINDOW), Some(1));
    }

    #[test]
    fn a_clock_that_goes_back_keeps_the_window() {
        let mut r = RateLimit::default();
        for _ in 0..BURST {
            r.admit(at(100));
        }
        assert_eq!(r.admit(at(1)), None);
    }

    #[test]
    fn a_guest_in_a_loop_logs_at_most_a_burst_per_window() {
        // One complaint every millisecond for ten minutes.
        let mut r = RateLimit::default();
        let logged = (0..600_000u64)
            .filter(|ms| r.admit(Duration::from_millis(*ms)).is_some())
            .count() as u64;
        assert_eq!(logged, 10 * u64::from(BURST));
        assert_eq!(r.total, 600_000);
        assert_eq!(r.suppressed, 600_000 - logged);
    }

    #[test]
    fn report_counts_every_complaint_by_kind() {
        for _ in 0..25 {
            report("test kind a", log::Level::Warn, format_args!("complaint a"));
        }
        report("test kind b", log::Level::Info, format_args!("complaint b"));
        let counts = counts();
        let a = counts.iter().find(|c| c.kind == "test kind a").unwrap();
        let b = counts.iter().find(|c| c.kind == "test kind b").unwrap();
        assert_eq!((a.total, a.suppressed), (25, 25 - u64::from(BURST)));
        assert_eq!((b.total, b.suppressed), (1, 0));
    }
}
