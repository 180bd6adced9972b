//! Per-object backoff after failed reconciles.

use std::{collections::HashMap, sync::Mutex, time::Duration};

/// Per-object exponential backoff after failed reconciles: 1 s, 2 s, 4 s ... up to 5 min,
/// back to the start after a success (so a source that is down is not hammered, and one that
/// comes back is picked up soon after).
#[derive(Default)]
pub struct Backoff {
    failures: Mutex<HashMap<String, u32>>,
}

impl Backoff {
    /// The first delay.
    pub const BASE: Duration = Duration::from_secs(1);
    /// The longest delay.
    pub const MAX: Duration = Duration::from_secs(300);

    /// The delay before the next attempt for `key`, counting this failure.
    pub fn next(&self, key: &str) -> Duration {
        let Ok(mut failures) = self.failures.lock() else { return Self::BASE };
        let n = failures.entry(key.to_string()).or_insert(0);
        let delay = Self::BASE.saturating_mul(1u32 << (*n).min(16)).min(Self::MAX);
        *n = n.saturating_add(1);
        delay
    }

    /// Forgets the failures of `key` (after a success).
    pub fn reset(&self, key: &str) {
        if let Ok(mut failures) = self.failures.lock() {
            failures.remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap_and_resets() {
        let b = Backoff::default();
        let delays: Vec<u64> = (0..12).map(|_| b.next("ns/a").as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300]);
        assert_eq!(b.next("ns/b"), Backoff::BASE, "keys are independent");
        b.reset("ns/a");
        assert_eq!(b.next("ns/a"), Backoff::BASE);
    }
}
