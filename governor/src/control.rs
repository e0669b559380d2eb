//! Measuring delivery efficiency and deciding how many workers to allocate.
//!
//! # Theory of operation
//! The [`Meter`] integrates, between two ticks, the number of allocated workers N(t) and the
//! number of busy sessions, and counts the attempts that ended. From that a [`Window`] gives:
//! - throughput R = attempts ended / period (what receivers see, the governed rate),
//! - efficiency E = R / time-average of N (claim 5),
//! - utilization U = busy session-time / allocated session-time (claim 4). A session idle
//!   because the pacer held jobs back, or because the queue was empty, is *not* busy,
//! - E_busy = E / U: what one fully busy worker delivers. This is the quantity the worker
//!   count is sized from, so that pacing-induced idleness or an empty queue never reads as
//!   slowness.
//!
//! [`decide`] is a pure function of the window, the target and the previous [`State`]: it
//! returns the worker count to aim for and the reason in words. The loop only measures and
//! applies.

use std::collections::VecDeque;
use std::time::Instant;

use serde::Serialize;

/// Extra capacity over the exact need, so that queueing inside the workers never limits the
/// rate (the pacer, not the worker count, does the fine control).
pub const HEADROOM: f64 = 1.10;
/// Weight of the newest sample in the smoothed busy-worker efficiency.
pub const EWMA_ALPHA: f64 = 0.4;
/// Utilization below which a window says too little about a busy worker to update E_busy.
pub const MIN_UTIL_SAMPLE: f64 = 0.05;
/// Scale-down goes only to the highest recommendation of this many recent ticks.
pub const DOWN_WINDOW: usize = 5;

/// Integrates the quantities the controller needs between two ticks.
#[derive(Debug, Clone)]
pub struct Meter {
    start: Instant,
    last: Instant,
    worker_secs: f64,
    busy_session_secs: f64,
    alloc_session_secs: f64,
    n: usize,
    busy: usize,
    sessions: usize,
    completed: u64,
    delivered: u64,
    deferred: u64,
    bounced: u64,
    in_doubt: u64,
    latencies_ms: Vec<u32>,
}

/// What one period measured.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Window {
    /// Length of the period in seconds.
    pub period_s: f64,
    /// Attempts that ended.
    pub attempts: u64,
    /// Of which delivered, deferred, bounced and in doubt.
    pub delivered: u64,
    /// Deferred attempts (4xx, network failures).
    pub deferred: u64,
    /// Bounced attempts (5xx, unsendable).
    pub bounced: u64,
    /// Attempts whose answer after the final dot was lost.
    pub in_doubt: u64,
    /// Throughput R, attempts/s.
    pub throughput: f64,
    /// Time-average of allocated workers.
    pub avg_workers: f64,
    /// Efficiency E = R / avg_workers, attempts/s per worker.
    pub efficiency: f64,
    /// Utilization U in [0, 1].
    pub utilization: f64,
    /// Share of attempts that failed (deferred + bounced + in doubt).
    pub failure_rate: f64,
    /// Median attempt latency, ms.
    pub latency_p50_ms: u32,
    /// 95th percentile attempt latency, ms.
    pub latency_p95_ms: u32,
}

impl Meter {
    /// A meter starting at `now` with `n` allocated workers of `sessions` sessions each.
    pub fn new(now: Instant, n: usize, sessions: usize) -> Self {
        Meter {
            start: now,
            last: now,
            worker_secs: 0.0,
            busy_session_secs: 0.0,
            alloc_session_secs: 0.0,
            n,
            busy: 0,
            sessions,
            completed: 0,
            delivered: 0,
            deferred: 0,
            bounced: 0,
            in_doubt: 0,
            latencies_ms: Vec::new(),
        }
    }

    /// Integrates up to `now`, then records the new level of allocated workers and busy
    /// sessions (call this whenever either changes, and before [`Meter::take`]).
    pub fn level(&mut self, now: Instant, allocated: usize, busy_sessions: usize) {
        let dt = now.saturating_duration_since(self.last).as_secs_f64();
        self.worker_secs += dt * self.n as f64;
        self.alloc_session_secs += dt * (self.n * self.sessions) as f64;
        // A draining worker's sessions are busy but not allocated: count at most allocated.
        self.busy_session_secs += dt * (self.busy.min(self.n * self.sessions)) as f64;
        self.last = now;
        self.n = allocated;
        self.busy = busy_sessions;
    }

    /// Counts one ended attempt.
    pub fn attempt(&mut self, kind: protocol::OutcomeKind, latency_ms: u32) {
        use protocol::OutcomeKind::*;
        self.completed += 1;
        match kind {
            Delivered => self.delivered += 1,
            Deferred => self.deferred += 1,
            Bounced => self.bounced += 1,
            InDoubt => self.in_doubt += 1,
        }
        self.latencies_ms.push(latency_ms);
    }

    /// Closes the period at `now`, returns its window and starts the next one.
    pub fn take(&mut self, now: Instant) -> Window {
        let (n, busy) = (self.n, self.busy);
        self.level(now, n, busy);
        let period_s = now.saturating_duration_since(self.start).as_secs_f64();
        let mut lat = std::mem::take(&mut self.latencies_ms);
        lat.sort_unstable();
        let pct = |p: f64| -> u32 {
            if lat.is_empty() {
                0
            } else {
                lat[((lat.len() - 1) as f64 * p).round() as usize]
            }
        };
        let throughput = if period_s > 0.0 {
            self.completed as f64 / period_s
        } else {
            0.0
        };
        let avg_workers = if period_s > 0.0 {
            self.worker_secs / period_s
        } else {
            0.0
        };
        let w = Window {
            period_s,
            attempts: self.completed,
            delivered: self.delivered,
            deferred: self.deferred,
            bounced: self.bounced,
            in_doubt: self.in_doubt,
            throughput,
            avg_workers,
            efficiency: if avg_workers > 0.0 {
                throughput / avg_workers
            } else {
                0.0
            },
            utilization: if self.alloc_session_secs > 0.0 {
                (self.busy_session_secs / self.alloc_session_secs).min(1.0)
            } else {
                0.0
            },
            failure_rate: if self.completed > 0 {
                (self.completed - self.delivered) as f64 / self.completed as f64
            } else {
                0.0
            },
            latency_p50_ms: pct(0.50),
            latency_p95_ms: pct(0.95),
        };
        *self = Meter {
            latencies_ms: lat,
            ..Meter::new(now, n, self.sessions)
        };
        self.latencies_ms.clear();
        self.busy = busy;
        w
    }
}

/// The controller's memory between ticks.
#[derive(Debug, Clone, Default, Serialize)]
pub struct State {
    /// Smoothed efficiency of a fully busy worker, attempts/s; None until first measured.
    pub e_busy: Option<f64>,
    /// Recent recommendations (newest last), for hysteresis on the way down.
    pub recent: VecDeque<usize>,
}

/// Everything [`decide`] looks at.
#[derive(Debug, Clone, Serialize)]
pub struct Inputs {
    /// Target rate R*, messages/s.
    pub target: f64,
    /// Workers allocated now (Ready) plus those starting.
    pub workers: usize,
    /// Bounds.
    pub min_workers: usize,
    /// Bounds.
    pub max_workers: usize,
    /// Whether there was work waiting (ready or due) during the window.
    pub backlog: bool,
    /// The last period's measurements.
    pub window: Window,
}

/// What to do, and why.
#[derive(Debug, Clone, Serialize)]
pub struct Decision {
    /// Worker count to aim for.
    pub workers: usize,
    /// Feed-forward requirement before clamping and hysteresis.
    pub required: f64,
    /// The reason in words, for the control log.
    pub reason: String,
    /// The state for the next tick.
    pub state: State,
}

/// Decides the worker count for the next period. Pure: same inputs, same answer.
pub fn decide(inp: &Inputs, prev: &State) -> Decision {
    let w = &inp.window;
    let mut state = prev.clone();
    let clamp = |n: usize| n.clamp(inp.min_workers, inp.max_workers.max(inp.min_workers));

    // 1. Update the busy-worker efficiency when the window says something about it.
    let sample = (w.attempts > 0 && w.utilization >= MIN_UTIL_SAMPLE && w.avg_workers > 0.0)
        .then(|| w.efficiency / w.utilization);
    if let Some(s) = sample {
        state.e_busy = Some(match prev.e_busy {
            Some(e) => EWMA_ALPHA * s + (1.0 - EWMA_ALPHA) * e,
            None => s,
        });
    }

    // 2. Feed-forward requirement.
    let (required, why) = if !inp.backlog && w.attempts == 0 {
        (inp.min_workers as f64, "no work waiting".to_string())
    } else {
        match state.e_busy {
            Some(e) if e > 0.0 => (
                inp.target * HEADROOM / e,
                format!(
                    "target {:.1}/s at {:.2}/s per busy worker (E {:.2}/s, U {:.0}%)",
                    inp.target,
                    e,
                    w.efficiency,
                    w.utilization * 100.0
                ),
            ),
            // Nothing measured yet: if the pool is saturated, grow by one; otherwise hold.
            _ if w.utilization > 0.9 => (
                (inp.workers + 1) as f64,
                "saturated before any measurement".to_string(),
            ),
            _ => (inp.workers as f64, "no measurement yet".to_string()),
        }
    };
    // (a tolerance so that 11.000000000000002 workers is 11, not 12)
    let rec = clamp((required - 1e-9).ceil().max(0.0) as usize);
    state.recent.push_back(rec);
    while state.recent.len() > DOWN_WINDOW {
        state.recent.pop_front();
    }

    // 3. Up at once; down only to the highest recent recommendation and outside a dead band.
    let current = inp.workers;
    let (workers, verb) = if rec > current {
        (rec, format!("scale up {current} -> {rec}"))
    } else {
        let ceiling = *state.recent.iter().max().unwrap_or(&rec);
        let band = ((current as f64 * 0.05).ceil() as usize).max(1);
        if current > ceiling && current - ceiling >= band && current > inp.min_workers {
            (ceiling, format!("scale down {current} -> {ceiling}"))
        } else if current < inp.min_workers {
            (
                inp.min_workers,
                format!("scale up {current} -> {} (min_workers)", inp.min_workers),
            )
        } else {
            (current, format!("hold {current}"))
        }
    };
    let workers = clamp(workers);
    Decision {
        workers,
        required,
        reason: format!("{verb}: {why}, need {required:.2}"),
        state,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn window(throughput: f64, avg_workers: f64, utilization: f64) -> Window {
        Window {
            period_s: 1.0,
            attempts: throughput as u64,
            throughput,
            avg_workers,
            efficiency: if avg_workers > 0.0 {
                throughput / avg_workers
            } else {
                0.0
            },
            utilization,
            ..Window::default()
        }
    }

    fn inputs(target: f64, workers: usize, w: Window) -> Inputs {
        Inputs {
            target,
            workers,
            min_workers: 1,
            max_workers: 50,
            backlog: true,
            window: w,
        }
    }

    #[test]
    fn meter_integrates_workers_and_utilization() {
        let t0 = Instant::now();
        let mut m = Meter::new(t0, 2, 4);
        m.level(t0, 2, 8); // fully busy for 0.5 s
        m.level(t0 + Duration::from_millis(500), 4, 0); // 4 workers idle for 0.5 s
        for _ in 0..30 {
            m.attempt(protocol::OutcomeKind::Delivered, 10);
        }
        let w = m.take(t0 + Duration::from_secs(1));
        assert!((w.avg_workers - 3.0).abs() < 1e-9, "{w:?}");
        assert!((w.throughput - 30.0).abs() < 1e-9);
        assert!((w.efficiency - 10.0).abs() < 1e-9);
        // busy 8*0.5 = 4 session-s of 8*0.5 + 16*0.5 = 12 allocated
        assert!(
            (w.utilization - 4.0 / 12.0).abs() < 1e-9,
            "{}",
            w.utilization
        );
    }

    #[test]
    fn sizes_from_busy_worker_efficiency_not_raw_efficiency() {
        // 4 workers pacing at 100/s, each only 25% busy: a busy worker does 100/s.
        let d = decide(
            &inputs(100.0, 4, window(100.0, 4.0, 0.25)),
            &State::default(),
        );
        assert_eq!(d.state.e_busy, Some(100.0));
        // need 100 * 1.1 / 100 = 1.1 -> 2 workers, but down only via the recent window: the
        // recommendation is 2, the band is 1, so it goes to 2.
        assert_eq!(d.workers, 2, "{}", d.reason);
        assert!(d.reason.starts_with("scale down 4 -> 2"), "{}", d.reason);
    }

    #[test]
    fn scales_up_at_once() {
        // 2 saturated workers deliver 40/s: 20/s each, target 200/s needs 11.
        let d = decide(&inputs(200.0, 2, window(40.0, 2.0, 1.0)), &State::default());
        assert_eq!(d.workers, 11, "{}", d.reason);
        assert!(d.reason.starts_with("scale up 2 -> 11"));
    }

    #[test]
    fn scale_down_only_to_the_highest_recent_recommendation() {
        let s = State {
            e_busy: Some(10.0),
            recent: VecDeque::from(vec![12, 9, 8]),
        };
        // now only 6 needed, but 12 was recommended recently: hold at 12.
        let d = decide(&inputs(50.0, 12, window(50.0, 12.0, 50.0 / 120.0)), &s);
        assert_eq!(d.workers, 12, "{}", d.reason);
    }

    #[test]
    fn dead_band_holds_small_excess() {
        let s = State {
            e_busy: Some(10.0),
            recent: VecDeque::from(vec![20; 4]),
        };
        // 20 workers, need ceil(172*1.1/10) = 19: 1 over but band at 20 workers is 1 -> the
        // recent window still holds 20 anyway; with all recent at 19 it would go down.
        let d = decide(&inputs(172.0, 20, window(172.0, 20.0, 0.86)), &s);
        assert_eq!(d.workers, 20, "{}", d.reason);
    }

    #[test]
    fn clamps_to_bounds() {
        let mut i = inputs(10_000.0, 2, window(40.0, 2.0, 1.0));
        i.max_workers = 8;
        assert_eq!(decide(&i, &State::default()).workers, 8);
        let mut i = inputs(1.0, 5, window(1.0, 5.0, 0.01));
        i.min_workers = 3;
        i.backlog = false;
        let s = State {
            e_busy: Some(20.0),
            recent: VecDeque::new(),
        };
        assert_eq!(decide(&i, &s).workers, 3);
    }

    #[test]
    fn idle_pool_with_no_work_goes_to_min_workers() {
        let s = State {
            e_busy: Some(20.0),
            recent: VecDeque::new(),
        };
        let mut i = inputs(100.0, 6, window(0.0, 6.0, 0.0));
        i.backlog = false;
        let d = decide(&i, &s);
        assert_eq!(d.workers, 1, "{}", d.reason);
        // and the estimate is not polluted by the idle window
        assert_eq!(d.state.e_busy, Some(20.0));
    }

    #[test]
    fn unmeasured_saturated_pool_grows_by_one() {
        let mut w = window(0.0, 1.0, 1.0);
        w.attempts = 0;
        let d = decide(&inputs(100.0, 1, w), &State::default());
        assert_eq!(d.workers, 2, "{}", d.reason);
    }
}
