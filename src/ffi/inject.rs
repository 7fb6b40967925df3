//! Test-only failures, so tests can prove what they turn into: panics at the library's panic
//! boundaries, and failures that the machine rarely produces (a thread that cannot start).
//! Compiled in only with the cargo feature `test-panics`, which no release build enables: then
//! `FLEETPROV_TEST_PANIC=<site>` in the environment makes the named site panic, and
//! `FLEETPROV_TEST_FAIL=<site>` makes the named operation fail. Without the feature every point
//! is an empty inline function.

/// Panics when the feature is on and `FLEETPROV_TEST_PANIC` names `site`.
#[cfg(feature = "test-panics")]
pub(crate) fn point(site: &str) {
    if std::env::var("FLEETPROV_TEST_PANIC").is_ok_and(|v| v == site) {
        panic!("fleetprov test panic injected at {site}");
    }
}

/// Without the `test-panics` feature: nothing.
#[cfg(not(feature = "test-panics"))]
#[inline(always)]
pub(crate) fn point(_site: &str) {}

/// Whether the operation `site` must fail: the feature is on and `FLEETPROV_TEST_FAIL` names it.
#[cfg(feature = "test-panics")]
pub(crate) fn fails(site: &str) -> bool {
    std::env::var("FLEETPROV_TEST_FAIL").is_ok_and(|v| v == site)
}

/// Without the `test-panics` feature: never.
#[cfg(not(feature = "test-panics"))]
#[inline(always)]
pub(crate) fn fails(_site: &str) -> bool {
    false
}

/// Starts a library worker thread (`thread-spawn` makes it fail, with the feature).
pub(crate) fn spawn_worker(
    builder: std::thread::Builder,
    body: impl FnOnce() + Send + 'static,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    if fails("thread-spawn") {
        return Err(std::io::Error::other(
            "injected failure (FLEETPROV_TEST_FAIL)",
        ));
    }
    builder.spawn(body)
}
