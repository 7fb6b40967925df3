//! Test-only panics at the library's panic boundaries, so tests can prove what a panic turns
//! into. Compiled in only with the cargo feature `test-panics`, which no release build enables:
//! then `FLEETPROV_TEST_PANIC=<site>` in the environment makes the named site panic. Without the
//! feature every point is an empty inline function.

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
