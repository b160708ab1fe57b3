//! Time as a parameter: everything that depends on "now" (TOTP steps, session expiry, challenge
//! lifetimes, throttling windows) asks a [`Clock`], so tests can move time without sleeping.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

/// Seconds since the Unix epoch.
pub type UnixTime = i64;

/// A source of the current time.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// The current time in milliseconds since the Unix epoch.
    fn now_millis(&self) -> i64;

    /// The current time in whole seconds since the Unix epoch.
    fn now(&self) -> UnixTime {
        self.now_millis().div_euclid(1000)
    }
}

/// The wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_millis(&self) -> i64 {
        // Read on every proxied request, several times: straight from the system time, without
        // a calendar date or 128-bit arithmetic. Before 1970 it counts down, truncating towards
        // zero as an integer division of nanoseconds would.
        let millis = |d: std::time::Duration| {
            i64::try_from(d.as_secs())
                .unwrap_or(i64::MAX)
                .saturating_mul(1000)
                .saturating_add(i64::from(d.subsec_millis()))
        };
        match std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
            Ok(since) => millis(since),
            Err(before) => -millis(before.duration()),
        }
    }
}

/// A clock that only moves when told to; shared between a test and the server it drives.
#[derive(Debug, Clone)]
pub struct ManualClock {
    millis: Arc<AtomicI64>,
}

impl ManualClock {
    /// A manual clock starting at the current wall-clock time.
    pub fn starting_now() -> Self {
        Self {
            millis: Arc::new(AtomicI64::new(SystemClock.now_millis())),
        }
    }

    /// Moves the clock forward by `secs` seconds.
    pub fn advance(&self, secs: i64) {
        self.millis.fetch_add(secs * 1000, Ordering::SeqCst);
    }

    /// Sets the clock to an absolute time in seconds.
    pub fn set(&self, secs: UnixTime) {
        self.millis.store(secs * 1000, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_millis(&self) -> i64 {
        self.millis.load(Ordering::SeqCst)
    }
}

/// Formats a Unix time as RFC 3339 (UTC), for pages, logs and the CLI.
pub fn rfc3339(t: UnixTime) -> String {
    time::OffsetDateTime::from_unix_timestamp(t)
        .ok()
        .and_then(|d| {
            d.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| t.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_system_clock_reads_unix_milliseconds() {
        let before = time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000;
        let now = i128::from(SystemClock.now_millis());
        let after = time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000;
        assert!(
            (before..=after).contains(&now),
            "{before} <= {now} <= {after}"
        );
    }

    #[test]
    fn manual_clock_moves_only_when_told() {
        let c = ManualClock::starting_now();
        let t0 = c.now();
        assert_eq!(c.now(), t0);
        c.advance(31);
        assert_eq!(c.now(), t0 + 31);
        c.set(1_000);
        assert_eq!(c.now(), 1_000);
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
    }
}
