//! The state of the migration under way or last done, as `query-migrate` reports it and the
//! `MIGRATION` event announces it (QEMU's `MigrationInfo`, the fields clients read).

use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// A migration's status (QEMU's `MigrationStatus` names).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// No migration was started.
    None,
    /// Opening the transport.
    Setup,
    /// Sending (or receiving) memory while the guest runs.
    Active,
    /// The guest is stopped and its last state is being sent.
    Device,
    /// Done.
    Completed,
    /// It failed; `error` says why.
    Failed,
    /// `migrate_cancel` was asked for.
    Cancelling,
    /// It was cancelled.
    Cancelled,
}

impl Status {
    /// The name QEMU gives the status.
    pub fn name(self) -> &'static str {
        match self {
            Status::None => "none",
            Status::Setup => "setup",
            Status::Active => "active",
            Status::Device => "device",
            Status::Completed => "completed",
            Status::Failed => "failed",
            Status::Cancelling => "cancelling",
            Status::Cancelled => "cancelled",
        }
    }

    /// Whether the migration has ended.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            Status::None | Status::Completed | Status::Failed | Status::Cancelled
        )
    }
}

/// What is known of the migration under way or last done.
#[derive(Clone, Debug)]
pub struct MigrationInfo {
    /// Its status.
    pub status: Status,
    /// When it started.
    pub started: Option<Instant>,
    /// How long it took, once it has ended.
    pub total_time: Option<Duration>,
    /// How long the guest was stopped for its last stage (or the whole of it).
    pub downtime: Option<Duration>,
    /// Setup time (opening the transport).
    pub setup_time: Option<Duration>,
    /// Bytes sent (or received) so far.
    pub transferred: u64,
    /// Guest RAM in bytes.
    pub ram_total: u64,
    /// Pages sent with their contents.
    pub normal_pages: u64,
    /// Pages sent as zero (or skipped as zero).
    pub zero_pages: u64,
    /// Passes over guest memory (the first one included).
    pub passes: u64,
    /// Pages still dirty after the last pass.
    pub remaining_pages: u64,
    /// Why it failed.
    pub error: Option<String>,
}

impl Default for MigrationInfo {
    fn default() -> Self {
        MigrationInfo {
            status: Status::None,
            started: None,
            total_time: None,
            downtime: None,
            setup_time: None,
            transferred: 0,
            ram_total: 0,
            normal_pages: 0,
            zero_pages: 0,
            passes: 0,
            remaining_pages: 0,
            error: None,
        }
    }
}

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

impl MigrationInfo {
    /// A migration starting now, of `ram_total` bytes of guest RAM.
    pub fn starting(ram_total: u64) -> Self {
        MigrationInfo {
            status: Status::Setup,
            started: Some(Instant::now()),
            ram_total,
            ..Default::default()
        }
    }

    /// `query-migrate`'s reply.
    pub fn to_json(&self) -> Value {
        if self.status == Status::None {
            return json!({});
        }
        let mut v = json!({ "status": self.status.name() });
        let elapsed = self
            .total_time
            .or_else(|| self.started.map(|s| s.elapsed()))
            .unwrap_or_default();
        v["total-time"] = json!(ms(elapsed));
        if let Some(d) = self.setup_time {
            v["setup-time"] = json!(ms(d));
        }
        if let Some(d) = self.downtime {
            v["downtime"] = json!(ms(d));
        }
        v["ram"] = json!({
            "transferred": self.transferred,
            "total": self.ram_total,
            "remaining": self.remaining_pages * crate::migration::stream::PAGE_SIZE,
            "duplicate": self.zero_pages,
            "normal": self.normal_pages,
            "normal-bytes": self.normal_pages * crate::migration::stream::PAGE_SIZE,
            "dirty-sync-count": self.passes,
            "page-size": crate::migration::stream::PAGE_SIZE,
        });
        if let Some(e) = &self.error {
            v["error-desc"] = json!(e);
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_migrate_shape() {
        assert_eq!(MigrationInfo::default().to_json(), json!({}));
        let mut m = MigrationInfo::starting(256 << 20);
        m.status = Status::Failed;
        m.error = Some("the source machine has 2 vCPUs, this one 1 (--cpus)".into());
        m.total_time = Some(Duration::from_millis(12));
        m.normal_pages = 3;
        let v = m.to_json();
        assert_eq!(v["status"], "failed");
        assert_eq!(v["total-time"], 12);
        assert_eq!(v["ram"]["total"], 256u64 << 20);
        assert_eq!(v["ram"]["normal-bytes"], 3 * 4096);
        assert!(v["error-desc"].as_str().unwrap().contains("--cpus"));
        assert!(Status::Cancelled.is_final() && !Status::Device.is_final());
    }
}
