//! The pacer: a token bucket that releases jobs at the target rate, smoothly.
//!
//! Tokens accrue continuously at `rate` per second and the bucket holds at most `burst` of them,
//! where `burst` is the rate times a short horizon (20 ms) but never below one token. So at any
//! rate the dispatcher sends at most 20 ms worth of jobs at once: there are no bursts at window
//! edges, and integer worker counts never show up as rate steps (workers give capacity, the
//! pacer gives the fine control). When there is no capacity to use a token it is lost rather
//! than saved up, so a stall is never followed by a catch-up burst.
//!
//! A second, completion-side bucket keeps the *ended* attempts (what receivers and the
//! benchmark see) from running ahead of the rate: every completion spends a credit that refills
//! at the same rate and holds at most [`CREDIT_HORIZON`] worth. In steady state completions
//! follow dispatch and the credit stays full; when the jobs in flight end all at once (a slow
//! receiver becomes fast again, so old slow jobs and new fast ones finish together) the credit
//! goes negative and dispatch waits until it is repaid. So the completed rate over any second
//! stays within about `CREDIT_HORIZON` of the target.

use std::time::{Duration, Instant};

/// How far ahead the bucket may run: the largest burst, expressed as time at the target rate.
const HORIZON: Duration = Duration::from_millis(20);
/// How far completions may run ahead of the rate before dispatch waits, as time at the rate.
pub const CREDIT_HORIZON: Duration = Duration::from_millis(60);

/// Token bucket pacing jobs to a rate.
#[derive(Debug, Clone)]
pub struct Pacer {
    rate: f64,
    tokens: f64,
    credit: f64,
    last: Instant,
}

impl Pacer {
    /// A pacer at `rate` messages/s, starting with one token so the first job goes at once.
    pub fn new(rate: f64, now: Instant) -> Self {
        Pacer {
            rate: rate.max(0.0),
            tokens: 1.0,
            credit: (rate.max(0.0) * CREDIT_HORIZON.as_secs_f64()).max(1.0),
            last: now,
        }
    }

    /// The current rate.
    pub fn rate(&self) -> f64 {
        self.rate
    }

    /// Changes the rate from now on (tokens accrued so far are kept, within the new burst).
    pub fn set_rate(&mut self, rate: f64, now: Instant) {
        self.refill(now);
        self.rate = rate.max(0.0);
        self.tokens = self.tokens.min(self.burst());
        self.credit = self.credit.min(self.credit_max());
    }

    fn credit_max(&self) -> f64 {
        (self.rate * CREDIT_HORIZON.as_secs_f64()).max(1.0)
    }

    /// Counts `n` attempts that ended (any outcome).
    pub fn completed(&mut self, n: usize, now: Instant) {
        self.refill(now);
        self.credit -= n as f64;
    }

    fn burst(&self) -> f64 {
        (self.rate * HORIZON.as_secs_f64()).max(1.0)
    }

    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + dt * self.rate).min(self.burst());
        self.credit = (self.credit + dt * self.rate).min(self.credit_max());
    }

    /// How many whole jobs may go now (none while completions are ahead of the rate).
    pub fn available(&mut self, now: Instant) -> usize {
        self.refill(now);
        if self.credit < 0.0 {
            // Tokens accrued while repaying are not saved up either.
            self.tokens = self.tokens.min(1.0);
            return 0;
        }
        self.tokens.floor().max(0.0) as usize
    }

    /// Spends `n` tokens (after `available`).
    pub fn take(&mut self, n: usize) {
        self.tokens -= n as f64;
    }

    /// Time until the next whole token, for the main loop's sleep.
    pub fn next_in(&self) -> Duration {
        if self.rate <= 0.0 {
            return Duration::from_secs(3600);
        }
        let debt = (-self.credit).max(0.0);
        let need = (1.0 - self.tokens).max(0.0).max(debt);
        Duration::from_secs_f64(need / self.rate)
    }

    /// Drops tokens that could not be used (no capacity or no work), so they are not saved up.
    pub fn forfeit(&mut self) {
        self.tokens = self.tokens.min(1.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// F14: a limiter of 1 msg/s with 5 jobs ready sends at about t = 0, 1, 2, 3, 4 s.
    #[test]
    fn one_per_second_with_five_ready_is_evenly_spaced() {
        let t0 = Instant::now();
        let mut p = Pacer::new(1.0, t0);
        let mut sent = Vec::new();
        let mut t = 0;
        while sent.len() < 5 && t <= 10_000 {
            let now = t0 + ms(t);
            let n = p.available(now).min(5 - sent.len());
            p.take(n);
            for _ in 0..n {
                sent.push(t);
            }
            t += 10;
        }
        assert_eq!(sent, vec![0, 1000, 2000, 3000, 4000]);
    }

    #[test]
    fn no_burst_after_a_long_idle_period() {
        let t0 = Instant::now();
        let mut p = Pacer::new(1000.0, t0);
        let n = p.available(t0);
        p.take(n);
        // 10 s idle: at most 20 ms worth (20 jobs) may go at once.
        assert_eq!(p.available(t0 + Duration::from_secs(10)), 20);
    }

    #[test]
    fn rate_is_met_over_time() {
        let t0 = Instant::now();
        let mut p = Pacer::new(250.0, t0);
        let mut total = 0;
        for i in 0..=1000 {
            let n = p.available(t0 + ms(i * 3)); // uneven 3 ms polling
            p.take(n);
            total += n;
        }
        // 3 s at 250/s = 750, plus the initial token
        assert!((749..=752).contains(&total), "{total}");
    }

    #[test]
    fn set_rate_clamps_saved_tokens() {
        let t0 = Instant::now();
        let mut p = Pacer::new(10_000.0, t0);
        let _ = p.available(t0 + ms(100));
        p.set_rate(10.0, t0 + ms(100));
        assert_eq!(p.available(t0 + ms(100)), 1);
    }

    #[test]
    fn completions_ahead_of_the_rate_hold_dispatch_back() {
        let t0 = Instant::now();
        let mut p = Pacer::new(100.0, t0);
        let n = p.available(t0);
        p.take(n);
        // steady state: one completion per token, dispatch goes on
        for i in 1..=50 {
            let now = t0 + ms(i * 10);
            p.completed(1, now);
            assert_eq!(p.available(now), 1, "at {i}");
            p.take(1);
        }
        // 30 jobs end at once (a receiver became fast): 6 are covered by the credit, the rest
        // is a debt of 24 jobs = 240 ms at 100/s during which nothing is dispatched
        let now = t0 + ms(510);
        p.completed(30, now);
        assert_eq!(p.available(now), 0);
        assert!(
            (p.next_in().as_secs_f64() - 0.24).abs() < 0.02,
            "{:?}",
            p.next_in()
        );
        assert_eq!(p.available(t0 + ms(700)), 0);
        // repaid at 750 ms: dispatch resumes with at most the usual 20 ms burst
        assert_eq!(p.available(t0 + ms(760)), 2);
    }

    #[test]
    fn next_in_predicts_the_next_token() {
        let t0 = Instant::now();
        let mut p = Pacer::new(4.0, t0);
        let n = p.available(t0);
        p.take(n);
        let d = p.next_in();
        assert!((d.as_secs_f64() - 0.25).abs() < 1e-9, "{d:?}");
    }
}
