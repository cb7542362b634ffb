//! The coordinator's one source of time. Everything that times out (agent silence, the
//! scheduling tick) or stamps a record reads it, so a test on tokio's paused clock can advance
//! the whole coordinator at once instead of waiting out real timeouts.

use tokio::time::Instant;

/// Wall-clock milliseconds and monotonic instants that advance together: both follow tokio's
/// clock from the moment the `Clock` was made (paused and advanced in tests).
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    origin: Instant,
    origin_ms: i64,
}

impl Clock {
    /// Starts at the system's wall-clock time.
    pub fn system() -> Clock {
        let origin_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        Clock { origin: Instant::now(), origin_ms }
    }

    /// Monotonic now, for timeouts.
    pub fn now(&self) -> Instant {
        Instant::now()
    }

    /// Milliseconds since the Unix epoch, for records and for the scheduler's `now_ms`.
    pub fn now_ms(&self) -> i64 {
        self.origin_ms + self.origin.elapsed().as_millis() as i64
    }

    /// The wall-clock time of a monotonic instant read from this clock.
    pub fn ms_at(&self, at: Instant) -> i64 {
        self.now_ms() - at.elapsed().as_millis() as i64
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::system()
    }
}
