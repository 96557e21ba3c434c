//! Per-object exponential backoff for transient errors. kube-runtime has none of its own (its
//! `trigger_backoff` paces the watch streams), so attempts are counted here per object key and
//! reset by the first successful reconcile.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;
use std::time::Duration;

/// Delays `base * 2^(attempt-1)`, capped, with ±10% jitter so a burst of failures spreads out.
#[derive(Debug)]
pub struct PerObjectBackoff<Key> {
    base: Duration,
    cap: Duration,
    attempts: Mutex<HashMap<Key, u32>>,
}

impl<Key: Eq + Hash> PerObjectBackoff<Key> {
    /// A backoff starting at `base` and never exceeding `cap`.
    pub fn new(base: Duration, cap: Duration) -> Self {
        Self { base, cap, attempts: Mutex::new(HashMap::new()) }
    }

    /// Records one more failure of `key` and returns how long to wait before retrying it.
    pub fn next_delay(&self, key: Key) -> Duration {
        let attempt = {
            let mut attempts = self.attempts.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            let attempt = attempts.entry(key).or_insert(0);
            *attempt = attempt.saturating_add(1);
            *attempt
        };
        let exponent = attempt.saturating_sub(1).min(31);
        let delay = self.base.saturating_mul(1u32 << exponent).min(self.cap);
        let jitter = rand::random_range(0.9..1.1);
        delay.mul_f64(jitter).min(self.cap)
    }

    /// Forgets the failures of `key` after it reconciled successfully.
    pub fn reset(&self, key: &Key) {
        self.attempts.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).remove(key);
    }

    /// Number of consecutive failures recorded for `key`.
    pub fn attempts(&self, key: &Key) -> u32 {
        self.attempts.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).get(key).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_per_failure_up_to_the_cap_and_reset_on_success() {
        let backoff = PerObjectBackoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let delays: Vec<Duration> = (0..6).map(|_| backoff.next_delay("a")).collect();
        let expected = [100, 200, 400, 800, 1000, 1000];
        for (delay, millis) in delays.iter().zip(expected) {
            let nominal = Duration::from_millis(millis);
            assert!(*delay >= nominal.mul_f64(0.89) && *delay <= nominal.min(Duration::from_secs(1)).mul_f64(1.1));
            assert!(*delay <= Duration::from_secs(1), "never above the cap");
        }
        assert_eq!(backoff.attempts(&"a"), 6);
        assert_eq!(backoff.attempts(&"b"), 0, "objects back off independently");
        backoff.reset(&"a");
        assert_eq!(backoff.attempts(&"a"), 0);
        assert!(backoff.next_delay("a") <= Duration::from_millis(110));
    }
}
