//! A token bucket shared by every caller of one client: waiting for it is pacing, not an error.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use super::config::RateLimitConfig;

#[derive(Debug)]
pub(crate) struct TokenBucket {
    rate: f64,
    burst: f64,
    state: Mutex<BucketState>,
}

#[derive(Debug)]
struct BucketState {
    tokens: f64,
    updated: Instant,
}

impl TokenBucket {
    pub fn new(config: RateLimitConfig) -> Self {
        let rate = config.requests_per_second.max(0.001);
        let burst = f64::from(config.burst.max(1));
        Self {
            rate,
            burst,
            state: Mutex::new(BucketState {
                tokens: burst,
                updated: Instant::now(),
            }),
        }
    }

    /// Takes one token, sleeping until it is there. Returns how long it waited.
    pub async fn acquire(&self) -> Duration {
        let wait = {
            let mut state = self.state.lock().expect("token bucket lock");
            let now = Instant::now();
            let elapsed = now.saturating_duration_since(state.updated).as_secs_f64();
            state.tokens = (state.tokens + elapsed * self.rate).min(self.burst);
            state.updated = now;
            // Reserve the token now, even if it is in the future: callers queue in order.
            state.tokens -= 1.0;
            if state.tokens >= 0.0 {
                Duration::ZERO
            } else {
                Duration::from_secs_f64(-state.tokens / self.rate)
            }
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
        wait
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn burst_passes_at_once_then_requests_are_paced_at_the_rate() {
        let bucket = TokenBucket::new(RateLimitConfig {
            requests_per_second: 10.0,
            burst: 5,
        });
        let start = Instant::now();
        for _ in 0..5 {
            assert_eq!(bucket.acquire().await, Duration::ZERO);
        }
        for _ in 0..10 {
            bucket.acquire().await;
        }
        // 10 more at 10 per second take a second of (virtual) time.
        let elapsed = start.elapsed();
        assert!(
            elapsed >= Duration::from_millis(990) && elapsed <= Duration::from_millis(1010),
            "{elapsed:?}"
        );
    }
}
