//! The restart-intensity limit: a worker that fails is restarted after a back-off that doubles
//! with each consecutive failure; more than `intensity` failures within `period` escalate (the
//! governor gives up, reports why, and exits with the jobs still queued). Pure logic with an
//! injected clock so it can be table-tested.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// What to do after a worker failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Restart the slot no earlier than after this delay.
    RestartAfter(Duration),
    /// Too many failures in the period: stop supervising and report.
    Escalate {
        /// Failures counted in the period.
        failures: usize,
    },
}

/// Restart bookkeeping for the whole pool.
#[derive(Debug, Clone)]
pub struct RestartPolicy {
    intensity: u32,
    period: Duration,
    backoff_max: Duration,
    failures: VecDeque<Instant>,
    consecutive: u32,
}

/// First back-off step; doubled per consecutive failure.
const BACKOFF_BASE: Duration = Duration::from_millis(100);

impl RestartPolicy {
    /// `intensity` failures are tolerated within `period`; back-off is capped at `backoff_max`.
    pub fn new(intensity: u32, period: Duration, backoff_max: Duration) -> Self {
        RestartPolicy {
            intensity,
            period,
            backoff_max,
            failures: VecDeque::new(),
            consecutive: 0,
        }
    }

    /// Records a failure at `now` and says what to do.
    pub fn failed(&mut self, now: Instant) -> Verdict {
        self.failures.push_back(now);
        while let Some(&t) = self.failures.front() {
            if now.duration_since(t) > self.period {
                self.failures.pop_front();
            } else {
                break;
            }
        }
        if self.failures.len() > self.intensity as usize {
            return Verdict::Escalate {
                failures: self.failures.len(),
            };
        }
        let step = BACKOFF_BASE.saturating_mul(1u32 << self.consecutive.min(16));
        self.consecutive += 1;
        Verdict::RestartAfter(step.min(self.backoff_max))
    }

    /// A worker completed work successfully: consecutive failures reset the back-off.
    pub fn healthy(&mut self) {
        self.consecutive = 0;
    }

    /// Failures currently counted in the period.
    pub fn recent(&self) -> usize {
        self.failures.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn backoff_doubles_and_is_capped() {
        let t0 = Instant::now();
        let mut p = RestartPolicy::new(100, Duration::from_secs(60), ms(1000));
        let got: Vec<Verdict> = (0..6).map(|i| p.failed(t0 + ms(i))).collect();
        let want: Vec<Verdict> = [100, 200, 400, 800, 1000, 1000]
            .iter()
            .map(|&d| Verdict::RestartAfter(ms(d)))
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn healthy_work_resets_backoff() {
        let t0 = Instant::now();
        let mut p = RestartPolicy::new(100, Duration::from_secs(60), ms(10_000));
        p.failed(t0);
        p.failed(t0);
        p.healthy();
        assert_eq!(p.failed(t0), Verdict::RestartAfter(ms(100)));
    }

    #[test]
    fn too_many_failures_in_the_period_escalate() {
        let t0 = Instant::now();
        let mut p = RestartPolicy::new(3, Duration::from_secs(10), ms(1000));
        for i in 0..3 {
            assert!(matches!(p.failed(t0 + ms(i)), Verdict::RestartAfter(_)));
        }
        assert_eq!(p.failed(t0 + ms(5)), Verdict::Escalate { failures: 4 });
    }

    #[test]
    fn failures_outside_the_period_are_forgotten() {
        let t0 = Instant::now();
        let mut p = RestartPolicy::new(2, Duration::from_secs(10), ms(1000));
        p.failed(t0);
        p.failed(t0 + Duration::from_secs(1));
        // 12 s later the first two are outside the window.
        assert!(matches!(
            p.failed(t0 + Duration::from_secs(12)),
            Verdict::RestartAfter(_)
        ));
        assert_eq!(p.recent(), 1);
    }
}
