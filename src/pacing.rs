//! CONNECTs per client id across the process. AWS IoT Core accepts one CONNECT per second per
//! client id and hangs up on a second one within that second (a quota that cannot be raised).
//! Every connection the built-in transport opens is recorded here, so that a flow or a
//! step-by-step client that connects soon after another one with the same client id (a
//! provisioning called again, the device's first connection right after the verification)
//! waits for the rest of that second instead of being refused. Client ids are counted per
//! endpoint (host and port), as AWS counts them per account.
// Without the built-in transport nothing records connects: the table stays empty.
#![cfg_attr(not(feature = "transport"), allow(dead_code))]

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use once_cell::sync::Lazy;

/// Least time between two CONNECTs with one client id.
pub(crate) const CONNECT_SPACING: Duration = Duration::from_secs(1);

/// (endpoint, client id) → when its last CONNECT went out or was answered.
type Table = HashMap<(String, String), Instant>;

static LAST: Lazy<Mutex<Table>> = Lazy::new(|| Mutex::new(HashMap::new()));

fn table() -> std::sync::MutexGuard<'static, Table> {
    LAST.lock().unwrap_or_else(|e| e.into_inner())
}

/// `host:port`, the endpoint key.
pub(crate) fn endpoint(host: &str, port: u16) -> String {
    format!("{host}:{port}")
}

/// Records a CONNECT with `client_id` to `endpoint` at `at` (an empty id, one the server or
/// the transport picks at random, is not recorded).
fn record_at(endpoint: &str, client_id: &str, at: Instant) {
    if client_id.is_empty() {
        return;
    }
    let mut last = table();
    let now = Instant::now();
    last.retain(|_, t| *t + CONNECT_SPACING > now);
    let entry = last
        .entry((endpoint.to_owned(), client_id.to_owned()))
        .or_insert(at);
    *entry = (*entry).max(at);
}

/// Records a CONNECT with `client_id` to `endpoint` going out, or answered, now.
pub(crate) fn record(endpoint: &str, client_id: &str) {
    record_at(endpoint, client_id, Instant::now());
}

/// How long a CONNECT with `client_id` to `endpoint` must wait; records it as going out then.
pub(crate) fn reserve(endpoint: &str, client_id: &str) -> Duration {
    let now = Instant::now();
    let wait = table()
        .get(&(endpoint.to_owned(), client_id.to_owned()))
        .map_or(Duration::ZERO, |t| {
            (*t + CONNECT_SPACING).saturating_duration_since(now)
        });
    record_at(endpoint, client_id, now + wait);
    wait
}

/// The client ids that connected to `endpoint` less than [`CONNECT_SPACING`] ago, with how
/// long ago in ms.
pub(crate) fn recent(endpoint: &str) -> Vec<(String, u64)> {
    let now = Instant::now();
    table()
        .iter()
        .filter(|((e, _), t)| e == endpoint && **t + CONNECT_SPACING > now)
        .map(|((_, id), t)| {
            let ago = now.saturating_duration_since(*t).as_millis();
            (id.clone(), u64::try_from(ago).unwrap_or(u64::MAX))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_connect_within_the_second_waits_for_the_rest_of_it() {
        let (e, id) = ("pacing.test:8883", "pacing-test-a");
        assert_eq!(reserve(e, id), Duration::ZERO);
        let wait = reserve(e, id);
        assert!(
            wait > Duration::from_millis(900) && wait <= CONNECT_SPACING,
            "{wait:?}"
        );
        // A third one goes a second after the second.
        let third = reserve(e, id);
        assert!(third > Duration::from_millis(1900), "{third:?}");
        assert!(recent(e).iter().any(|(i, _)| i == id));
        // Other ids, other endpoints and random ids are not held up.
        assert_eq!(reserve(e, "pacing-test-b"), Duration::ZERO);
        assert_eq!(reserve("other.test:8883", id), Duration::ZERO);
        assert!(!recent("third.test:8883").iter().any(|(i, _)| i == id));
        assert_eq!(reserve(e, ""), Duration::ZERO);
        assert_eq!(reserve(e, ""), Duration::ZERO);
        assert!(!recent(e).iter().any(|(i, _)| i.is_empty()));
    }
}
