//! Driving `migrate` and reading run states over QMP, as a management layer would.

use std::time::{Duration, Instant};

use serde_json::json;

use super::qmp::QmpClient;

/// How long a migration of the test guest may take on a slow host.
pub const MIGRATE_TIMEOUT: Duration = Duration::from_secs(120);

/// Starts a migration to `uri`, forgetting the MIGRATION events of earlier ones.
pub fn migrate(q: &mut QmpClient, uri: &str) {
    q.events.retain(|e| e["event"] != "MIGRATION");
    q.ok("migrate", json!({ "uri": uri }));
}

/// Waits for the `MIGRATION` event that ends a migration and requires its status to be
/// `status`; fails with query-migrate's reply otherwise.
pub fn wait_migration(q: &mut QmpClient, status: &str) {
    let got = q.wait_event_where(
        |v| {
            v["event"] == "MIGRATION"
                && matches!(
                    v["data"]["status"].as_str(),
                    Some("completed" | "failed" | "cancelled")
                )
        },
        MIGRATE_TIMEOUT,
    );
    let info = q.ok("query-migrate", json!({}));
    assert_eq!(
        got.as_ref().map(|e| e["data"]["status"].clone()),
        Some(json!(status)),
        "migration: {info}"
    );
    assert_eq!(info["status"], status, "{info}");
}

/// `query-status`'s run state.
pub fn status(q: &mut QmpClient) -> String {
    q.ok("query-status", json!({}))["status"]
        .as_str()
        .unwrap()
        .to_string()
}

/// The run state once a migration coming in has ended (the control socket is up before).
pub fn status_after_incoming(q: &mut QmpClient) -> String {
    let deadline = Instant::now() + MIGRATE_TIMEOUT;
    loop {
        let s = status(q);
        if s != "inmigrate" || Instant::now() > deadline {
            return s;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
