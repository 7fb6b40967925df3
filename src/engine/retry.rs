//! When to try again: exponential backoff with jitter, bounded by attempts and the deadline.

use std::time::Duration;

/// The smallest backoff step, whatever the configuration says: pauses are drawn between half
/// and all of a step, so none is under 25 ms. No tight loops.
pub const MIN_BACKOFF: Duration = Duration::from_millis(50);

/// How failed attempts are retried. Only retryable failures count ([`crate::Error::is_retryable`]:
/// connection trouble, timeouts, 429 and 5xx rejections); any other failure ends the flow at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included (1 = no retries).
    pub max_attempts: u32,
    /// Pause before the second attempt; it doubles for each further attempt.
    pub initial_backoff: Duration,
    /// Upper bound of the pause.
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    /// 5 attempts, 1 s doubling up to 30 s.
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 5,
            initial_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(30),
        }
    }
}

impl RetryPolicy {
    /// No retries.
    pub fn none() -> Self {
        RetryPolicy {
            max_attempts: 1,
            ..RetryPolicy::default()
        }
    }

    /// The pause after failed attempt number `attempt` (1-based), in ms. `random` is any
    /// uniformly distributed value. "Equal jitter": half the exponential step is fixed, the other
    /// half random, so that devices failing together spread out while none retries at once.
    pub fn backoff_ms(&self, attempt: u32, random: u64) -> u64 {
        let floor = MIN_BACKOFF.as_millis() as u64;
        let initial = (self.initial_backoff.as_millis() as u64).max(floor);
        let max = (self.max_backoff.as_millis() as u64).max(initial);
        let shift = attempt.saturating_sub(1).min(32);
        let step = initial.saturating_mul(1u64 << shift).min(max);
        let half = step / 2;
        half + random % (step - half + 1)
    }
}

/// A small xorshift generator for jitter; not for secrets.
#[derive(Debug, Clone)]
pub struct Jitter(u64);

impl Jitter {
    pub fn new(seed: u64) -> Self {
        Jitter(seed | 1)
    }

    pub fn draw(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_with_jitter_between_half_and_full_step() {
        let p = RetryPolicy {
            max_attempts: 10,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(1000),
        };
        let mut j = Jitter::new(42);
        for (attempt, step) in [(1, 100), (2, 200), (3, 400), (4, 800), (5, 1000), (9, 1000)] {
            for _ in 0..200 {
                let d = p.backoff_ms(attempt, j.draw());
                assert!(
                    d >= step / 2 && d <= step,
                    "attempt {attempt}: {d} not in [{}, {step}]",
                    step / 2
                );
            }
        }
        // Both ends are reachable.
        assert_eq!(p.backoff_ms(1, 0), 50);
        assert_eq!(p.backoff_ms(1, 50), 100);
    }

    #[test]
    fn backoff_never_below_the_floor_or_overflowing() {
        let p = RetryPolicy {
            max_attempts: u32::MAX,
            initial_backoff: Duration::ZERO,
            max_backoff: Duration::ZERO,
        };
        assert!(p.backoff_ms(1, 0) >= MIN_BACKOFF.as_millis() as u64 / 2);
        let big = RetryPolicy {
            max_attempts: u32::MAX,
            initial_backoff: Duration::from_secs(u64::MAX / 2000),
            max_backoff: Duration::from_secs(u64::MAX / 1000),
        };
        let d = big.backoff_ms(u32::MAX, u64::MAX);
        assert!(d > 0);
    }

    #[test]
    fn jitter_spreads() {
        let mut j = Jitter::new(7);
        let p = RetryPolicy::default();
        let a: std::collections::HashSet<u64> =
            (0..50).map(|_| p.backoff_ms(3, j.draw())).collect();
        assert!(a.len() > 25, "only {} distinct pauses", a.len());
    }
}
