//! Measuring delivery efficiency and deciding how many workers to allocate and at what rate to
//! dispatch.
//!
//! # Theory of operation
//! The [`Meter`] integrates, between two decisions, the number of allocated workers N(t) and the
//! number of busy sessions, and counts the attempts that ended, by reply class and by worker.
//! From that a [`Window`] gives:
//! - throughput R = attempts ended / period (what receivers see, the governed rate),
//! - efficiency E = R / time-average of N (claim 5), and per worker (its delivered/s),
//! - utilization U = busy session-time / allocated session-time (claim 4). A session idle
//!   because the pacer held jobs back, or because the queue was empty, is *not* busy,
//! - E_busy = E / U: what one fully busy worker delivers. This is the quantity the worker
//!   count is sized from, so that pacing-induced idleness or an empty queue never reads as
//!   slowness (an idle worker lowers E and U alike, not their ratio),
//! - the reply mix (2xx, 4xx, 5xx, 421, refused connections), failure rate and latency
//!   percentiles.
//!
//! [`decide`] is one pure function of the window, the target and the previous [`State`]:
//! 1. **Backpressure** first: a surge of 4xx / 421 / refused connections (at least
//!    [`CUT_SHARE`] of the replies) multiplies the rate by [`CUT_FACTOR`] at once; it grows back
//!    (by [`REGROW_PER_S`] per second) only after [`CLEAN_RUN_S`] of clean windows (below
//!    [`CLEAN_SHARE`]): reverse hysteresis, as Postfix does with its destination concurrency.
//!    The effective rate R_eff = target x factor is what the pacer uses.
//! 2. **Feed-forward**: N_ff = R_eff x [`HEADROOM`] / E_busy, E_busy smoothed (fast when it
//!    falls, so a slowdown is answered at the next tick; slower when it rises).
//! 3. **PI trim** on the rate error R_eff - R (only while work is waiting, so an empty queue is
//!    not a shortfall), in workers: (Kp e + Ki integral e dt) / E_busy. Anti-windup: the
//!    integral stops when N is clamped in the direction of the error, while workers are still
//!    starting (the capacity is on its way), and it leaks when the error is inside a small band.
//! 4. **Allocation**: outside a dead band of max(1 worker, 5%), scale up at once; scale down
//!    only to the highest recommendation of the last `down_window_s` seconds. When the workers
//!    to shed would take longer than a control period to drain (their latency is long), the
//!    decision asks for them to be killed instead: their jobs go back to the queue in doubt.
//!
//! The loop only measures and applies; every decision carries its reason in words.

use std::collections::{HashMap, VecDeque};
use std::time::Instant;

use protocol::{OutcomeKind, Stage};
use serde::{Deserialize, Serialize};

/// Extra capacity over the exact need, so that queueing for a free session never limits the
/// rate (the pacer, not the worker count, does the fine control). See scripts/bench-control.
pub const HEADROOM: f64 = 1.05;
/// Time constant of the busy-worker efficiency's smoothing when it rises, seconds.
pub const EWMA_TAU_S: f64 = 2.0;
/// A sample this far below the estimate (ratio) replaces it at once: a slowdown must be
/// answered at the next tick, not after the smoothing has caught up.
pub const FAST_DROP: f64 = 0.8;
/// Utilization below which a window says too little about a busy worker to update E_busy.
pub const MIN_UTIL_SAMPLE: f64 = 0.05;
/// Proportional gain of the trim (per unit of rate error, msgs/s per msgs/s).
pub const KP: f64 = 0.1;
/// Integral gain of the trim, per second.
pub const KI: f64 = 0.3;
/// Relative rate error inside which the integral leaks instead of growing.
pub const ERROR_BAND: f64 = 0.03;
/// Time constant of that leak, seconds.
pub const LEAK_TAU_S: f64 = 20.0;
/// The integral never exceeds this share of the rate.
pub const INTEGRAL_MAX: f64 = 0.5;
/// Share of replies that are 4xx, 421 or refused connections that counts as a surge.
pub const CUT_SHARE: f64 = 0.05;
/// Fewest pushback replies in a window for a surge (a handful says nothing).
pub const CUT_MIN_EVENTS: u64 = 3;
/// The multiplicative cut.
pub const CUT_FACTOR: f64 = 0.5;
/// At most one cut per this many seconds (the effect of a cut needs a moment to show).
pub const CUT_HOLDOFF_S: f64 = 0.9;
/// The rate is never cut below this share of the target.
pub const MIN_FACTOR: f64 = 0.02;
/// Share of pushback below which a window is clean.
pub const CLEAN_SHARE: f64 = 0.01;
/// Length of the clean run needed before the rate grows back, seconds.
pub const CLEAN_RUN_S: f64 = 5.0;
/// Growth of the rate factor per second of clean run once it may grow.
pub const REGROW_PER_S: f64 = 1.3;
/// Scale-down goes only to the highest recommendation of this many control intervals.
pub const DOWN_WINDOW_TICKS: usize = 5;
/// Relative dead band for the worker count (with at least one worker).
pub const DEAD_BAND: f64 = 0.05;

/// Reply classes, counted per window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mix {
    /// 2xx after the final dot.
    pub ok: u64,
    /// 4xx other than 421.
    pub temp: u64,
    /// 5xx.
    pub perm: u64,
    /// 421 (service closing / too many connections).
    pub c421: u64,
    /// The connection was refused or the greeting never came (no SMTP code).
    pub refused: u64,
    /// Other failures without an SMTP code (timeouts, lost answers, local errors).
    pub other: u64,
}

impl Mix {
    /// Classifies one attempt by its SMTP code and the stage it ended at.
    pub fn add(&mut self, code: u16, stage: Stage) {
        match code {
            200..=299 => self.ok += 1,
            421 => self.c421 += 1,
            400..=499 => self.temp += 1,
            500..=599 => self.perm += 1,
            _ if matches!(stage, Stage::Connect | Stage::Greeting) => self.refused += 1,
            _ => self.other += 1,
        }
    }

    /// Replies that say "slow down": 4xx, 421 and refused connections.
    pub fn pushback(&self) -> u64 {
        self.temp + self.c421 + self.refused
    }
}

/// Integrates the quantities the controller needs between two decisions.
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
    mix: Mix,
    per_worker: HashMap<u32, u64>,
    latencies_ms: Vec<u32>,
}

/// What one period measured.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Window {
    /// Length of the period in seconds.
    pub period_s: f64,
    /// Attempts that ended.
    pub attempts: u64,
    /// Delivered attempts.
    pub delivered: u64,
    /// Deferred attempts (4xx, network failures).
    pub deferred: u64,
    /// Bounced attempts (5xx, unsendable).
    pub bounced: u64,
    /// Attempts whose answer after the final dot was lost.
    pub in_doubt: u64,
    /// Reply classes.
    pub mix: Mix,
    /// Share of attempts that were pushback (4xx, 421, refused).
    pub pushback_rate: f64,
    /// Throughput R, attempts/s.
    pub throughput: f64,
    /// Time-average of allocated workers.
    pub avg_workers: f64,
    /// Efficiency E = R / avg_workers, attempts/s per worker.
    pub efficiency: f64,
    /// Utilization U in [0, 1].
    pub utilization: f64,
    /// E / U: attempts/s of a fully busy worker (0 when U is too small to say).
    pub busy_efficiency: f64,
    /// Delivered/s of each worker slot that delivered in the window.
    pub per_worker: Vec<(u32, f64)>,
    /// Share of attempts that failed (deferred + bounced + in doubt).
    pub failure_rate: f64,
    /// Median attempt latency, ms.
    pub latency_p50_ms: u32,
    /// 95th percentile attempt latency, ms.
    pub latency_p95_ms: u32,
    /// 99th percentile attempt latency, ms.
    pub latency_p99_ms: u32,
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
            mix: Mix::default(),
            per_worker: HashMap::new(),
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

    /// Counts one ended attempt of worker `slot`.
    pub fn record(&mut self, slot: u32, kind: OutcomeKind, code: u16, stage: Stage, ms: u32) {
        self.completed += 1;
        match kind {
            OutcomeKind::Delivered => {
                self.delivered += 1;
                *self.per_worker.entry(slot).or_default() += 1;
            }
            OutcomeKind::Deferred => self.deferred += 1,
            OutcomeKind::Bounced => self.bounced += 1,
            OutcomeKind::InDoubt => self.in_doubt += 1,
        }
        self.mix.add(code, stage);
        self.latencies_ms.push(ms);
    }

    /// Counts one attempt with a typical code for its kind (for tests and simple callers).
    pub fn attempt(&mut self, kind: OutcomeKind, latency_ms: u32) {
        let (code, stage) = match kind {
            OutcomeKind::Delivered => (250, Stage::FinalDot),
            OutcomeKind::Deferred => (451, Stage::FinalDot),
            OutcomeKind::Bounced => (550, Stage::FinalDot),
            OutcomeKind::InDoubt => (0, Stage::FinalDot),
        };
        self.record(0, kind, code, stage, latency_ms);
    }

    /// Attempts counted since the last [`Meter::take`].
    pub fn attempts(&self) -> u64 {
        self.completed
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
        let per_s = |x: f64| if period_s > 0.0 { x / period_s } else { 0.0 };
        let throughput = per_s(self.completed as f64);
        let avg_workers = per_s(self.worker_secs);
        let efficiency = if avg_workers > 0.0 {
            throughput / avg_workers
        } else {
            0.0
        };
        let utilization = if self.alloc_session_secs > 0.0 {
            (self.busy_session_secs / self.alloc_session_secs).min(1.0)
        } else {
            0.0
        };
        let mut per_worker: Vec<(u32, f64)> = self
            .per_worker
            .iter()
            .map(|(&s, &d)| (s, per_s(d as f64)))
            .collect();
        per_worker.sort_by_key(|p| p.0);
        let share = |x: u64| {
            if self.completed > 0 {
                x as f64 / self.completed as f64
            } else {
                0.0
            }
        };
        let w = Window {
            period_s,
            attempts: self.completed,
            delivered: self.delivered,
            deferred: self.deferred,
            bounced: self.bounced,
            in_doubt: self.in_doubt,
            mix: self.mix,
            pushback_rate: share(self.mix.pushback()),
            throughput,
            avg_workers,
            efficiency,
            utilization,
            busy_efficiency: if utilization >= MIN_UTIL_SAMPLE {
                efficiency / utilization
            } else {
                0.0
            },
            per_worker,
            failure_rate: share(self.completed - self.delivered),
            latency_p50_ms: pct(0.50),
            latency_p95_ms: pct(0.95),
            latency_p99_ms: pct(0.99),
        };
        lat.clear();
        let mut per_worker = std::mem::take(&mut self.per_worker);
        per_worker.clear();
        *self = Meter {
            latencies_ms: lat,
            per_worker,
            ..Meter::new(now, n, self.sessions)
        };
        self.busy = busy;
        w
    }
}

/// The controller's memory between decisions.
#[derive(Debug, Clone, Serialize)]
pub struct State {
    /// Smoothed efficiency of a fully busy worker, attempts/s; None until first measured.
    pub e_busy: Option<f64>,
    /// Recent recommendations (time in s, workers), newest last, for hysteresis on the way down.
    pub recent: VecDeque<(f64, usize)>,
    /// Integral part of the trim, msgs/s.
    pub integral: f64,
    /// Backpressure factor on the target rate, in [MIN_FACTOR, 1].
    pub factor: f64,
    /// When the rate was last cut (s).
    pub last_cut_s: Option<f64>,
    /// Start of the current run of clean windows (s).
    pub clean_since_s: Option<f64>,
    /// Target of the previous decision (to explain changes).
    pub last_target: Option<f64>,
    /// Median latency of the previous window with attempts, ms (to explain changes).
    pub last_p50_ms: Option<u32>,
}

impl Default for State {
    fn default() -> Self {
        State {
            e_busy: None,
            recent: VecDeque::new(),
            integral: 0.0,
            factor: 1.0,
            last_cut_s: None,
            clean_since_s: None,
            last_target: None,
            last_p50_ms: None,
        }
    }
}

/// Everything [`decide`] looks at.
#[derive(Debug, Clone, Serialize)]
pub struct Inputs {
    /// Time of the decision, seconds on a monotonic clock (only differences matter).
    pub now_s: f64,
    /// Target rate R* from the target schedule, messages/s (before backpressure).
    pub target: f64,
    /// Workers allocated now (Ready) plus those starting.
    pub workers: usize,
    /// Of which still starting.
    pub starting: usize,
    /// Bounds.
    pub min_workers: usize,
    /// Bounds.
    pub max_workers: usize,
    /// Whether there was work waiting (ready or due) during the window.
    pub backlog: bool,
    /// Scale-down goes only to the highest recommendation of this many recent seconds.
    pub down_window_s: f64,
    /// Workers to shed are killed rather than drained when draining would take longer than
    /// this (seconds; the control period).
    pub drain_budget_s: f64,
    /// The last period's measurements.
    pub window: Window,
}

/// What the rate-limiting part decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RateAction {
    /// No backpressure change.
    Hold,
    /// Cut at once (a surge of pushback).
    Cut,
    /// Growing back after a clean run.
    Regrow,
}

/// What to do, and why.
#[derive(Debug, Clone, Serialize)]
pub struct Decision {
    /// Worker count to aim for.
    pub workers: usize,
    /// The effective rate the pacer must use, messages/s (target x backpressure factor).
    pub rate: f64,
    /// Shed by killing busy workers (their jobs are requeued in doubt) instead of draining.
    pub kill: bool,
    /// Feed-forward requirement (workers, before trim, clamping and hysteresis).
    pub required: f64,
    /// PI trim, workers.
    pub trim: f64,
    /// The recommendation of this tick (clamped), before hysteresis.
    pub recommended: usize,
    /// What the backpressure part did.
    pub rate_action: RateAction,
    /// The reason in words, for the control log.
    pub reason: String,
    /// The state for the next decision.
    pub state: State,
}

fn pct_change(from: f64, to: f64) -> f64 {
    if from > 0.0 {
        (to - from) / from * 100.0
    } else {
        0.0
    }
}

/// Decides the worker count and the rate for the next period. Pure: same inputs, same answer.
pub fn decide(inp: &Inputs, prev: &State) -> Decision {
    let w = &inp.window;
    let dt = w.period_s.max(0.0);
    let now = inp.now_s;
    let mut state = prev.clone();
    let max_w = inp.max_workers.max(inp.min_workers);
    let clamp = |n: usize| n.clamp(inp.min_workers, max_w);
    let mut causes: Vec<String> = Vec::new();

    // 0. Target changes are worth a word.
    if let Some(t) = prev.last_target
        && (t - inp.target).abs() > 1e-9 * t.max(1.0)
    {
        causes.push(format!("target {t:.1}/s -> {:.1}/s", inp.target));
    }
    state.last_target = Some(inp.target);

    // 1. Backpressure on the rate.
    let pushback = w.mix.pushback();
    let share = w.pushback_rate;
    let mut rate_action = RateAction::Hold;
    let before = prev.factor * inp.target;
    if pushback >= CUT_MIN_EVENTS && share >= CUT_SHARE {
        state.clean_since_s = None;
        let may_cut = prev.last_cut_s.is_none_or(|t| now - t >= CUT_HOLDOFF_S);
        if may_cut && prev.factor > MIN_FACTOR {
            state.factor = (prev.factor * CUT_FACTOR).max(MIN_FACTOR);
            state.last_cut_s = Some(now);
            rate_action = RateAction::Cut;
            causes.push(format!(
                "backpressure: {:.0}% of replies were 4xx/421/refused ({} 4xx, {} 421, {} refused), rate cut {before:.1} -> {:.1}/s",
                share * 100.0,
                w.mix.temp,
                w.mix.c421,
                w.mix.refused,
                state.factor * inp.target
            ));
        } else {
            causes.push(format!(
                "backpressure continues ({:.0}% pushback), rate held at {before:.1}/s",
                share * 100.0
            ));
        }
    } else if w.attempts > 0 && share <= CLEAN_SHARE {
        let since = *state.clean_since_s.get_or_insert(now - dt);
        if prev.factor < 1.0 {
            let clean = now - since;
            if clean >= CLEAN_RUN_S {
                state.factor = (prev.factor * REGROW_PER_S.powf(dt)).min(1.0);
                rate_action = RateAction::Regrow;
                causes.push(format!(
                    "clean for {clean:.1}s: rate grows back {before:.1} -> {:.1}/s",
                    state.factor * inp.target
                ));
            } else {
                causes.push(format!(
                    "rate held at {before:.1}/s until {CLEAN_RUN_S:.0}s clean ({clean:.1}s so far)"
                ));
            }
        }
    } else if w.attempts > 0 {
        // Between the two thresholds: neither a surge nor clean. The clean run restarts.
        state.clean_since_s = None;
    }
    let rate = inp.target * state.factor;

    // 2. Busy-worker efficiency: fall fast, rise smoothly.
    let sample = (w.attempts > 0 && w.utilization >= MIN_UTIL_SAMPLE && w.avg_workers > 0.0)
        .then(|| w.efficiency / w.utilization);
    if let Some(s) = sample {
        let e = match prev.e_busy {
            Some(e) if s < e * FAST_DROP => s,
            Some(e) => {
                let alpha = 1.0 - (-dt / EWMA_TAU_S).exp();
                alpha * s + (1.0 - alpha) * e
            }
            None => s,
        };
        if let Some(old) = prev.e_busy {
            let change = pct_change(old, e);
            if change.abs() >= 10.0 {
                let lat = match (prev.last_p50_ms, w.latency_p50_ms) {
                    (Some(a), b) if b > a => format!(" after latency rose (p50 {a} -> {b} ms)"),
                    (Some(a), b) if b < a => format!(" after latency fell (p50 {a} -> {b} ms)"),
                    _ => String::new(),
                };
                let verb = if change < 0.0 { "fell" } else { "rose" };
                causes.push(format!(
                    "efficiency of a busy worker {verb} {:.0}%{lat}",
                    change.abs()
                ));
            }
        }
        state.e_busy = Some(e);
    }
    if w.attempts > 0 {
        state.last_p50_ms = Some(w.latency_p50_ms);
    }

    // 3. Feed-forward and PI trim.
    let idle = !inp.backlog && w.attempts == 0;
    let (required, trim, basis) = if idle {
        state.integral = 0.0;
        (inp.min_workers as f64, 0.0, "no work waiting".to_string())
    } else {
        match state.e_busy {
            Some(e) if e > 0.0 => {
                let ff = rate * HEADROOM / e;
                // The trim corrects what the feed-forward misses: a shortfall while the pool is
                // still smaller than the feed-forward need (start-up, a step) is not one.
                let sized = inp.starting == 0 && inp.workers as f64 >= (ff - 1e-9).ceil();
                // One-sided: the pacer bounds the rate, so more completions than the rate (jobs
                // of a higher old rate ending) never mean too many workers; integrating them
                // would wind the trim down after every step down.
                let err =
                    if sized && inp.backlog && w.attempts > 0 && rate_action != RateAction::Cut {
                        (rate - w.throughput).max(0.0)
                    } else {
                        0.0
                    };
                let p = KP * err;
                let unclamped = ff + (p + prev.integral) / e;
                let pushing_max = err > 0.0 && unclamped.ceil() >= max_w as f64;
                let band = ERROR_BAND * rate;
                if err.abs() <= band || idle {
                    state.integral = prev.integral * (-dt / LEAK_TAU_S).exp();
                } else if !pushing_max {
                    let lim = INTEGRAL_MAX * rate;
                    state.integral = (prev.integral + KI * err * dt).clamp(-lim, lim);
                }
                let trim = ((p + state.integral) / e).max(-ff);
                if trim.abs() >= 0.5 {
                    causes.push(format!(
                        "throughput {:.1}/s vs {rate:.1}/s: trim {trim:+.1}",
                        w.throughput
                    ));
                }
                (ff, trim, format!("{rate:.1}/s at {e:.1}/s per busy worker"))
            }
            // Nothing measured yet: if the pool is saturated, grow by one; otherwise hold.
            _ if w.utilization > 0.9 => (
                (inp.workers + 1) as f64,
                0.0,
                "saturated before any measurement".to_string(),
            ),
            _ => (inp.workers as f64, 0.0, "no measurement yet".to_string()),
        }
    };
    // (a tolerance so that 11.000000000000002 workers is 11, not 12)
    let need = required + trim;
    let rec = clamp((need - 1e-9).ceil().max(0.0) as usize);
    state.recent.push_back((now, rec));
    while let Some(&(t, _)) = state.recent.front() {
        if now - t > inp.down_window_s && state.recent.len() > 1 {
            state.recent.pop_front();
        } else {
            break;
        }
    }

    // 4. Up at once; down only to the highest recent recommendation; nothing inside the band.
    let current = inp.workers;
    let band = ((current as f64 * DEAD_BAND).ceil() as usize).max(1);
    let ceiling = state.recent.iter().map(|r| r.1).max().unwrap_or(rec);
    let (workers, verb) = if current < inp.min_workers {
        (
            inp.min_workers,
            format!("scale up {current} -> {} (min_workers)", inp.min_workers),
        )
    } else if current > max_w {
        (
            max_w,
            format!("scale down {current} -> {max_w} (max_workers)"),
        )
    } else if rec >= current + band {
        (rec, format!("scale up {current} -> {rec}"))
    } else if current >= ceiling + band {
        (ceiling, format!("scale down {current} -> {ceiling}"))
    } else {
        (current, format!("hold {current}"))
    };
    let workers = clamp(workers);
    // Draining takes about one latency; if that is longer than a period, kill instead.
    let kill =
        workers < current && !idle && f64::from(w.latency_p95_ms) / 1000.0 > inp.drain_budget_s;
    let verb = if kill {
        verb.replacen("scale down", "kill", 1)
    } else {
        verb
    };
    let mut reason = verb;
    reason.push_str(": ");
    if causes.is_empty() {
        reason.push_str(&format!("need {need:.1} workers for {basis}"));
    } else {
        reason.push_str(&causes.join("; "));
        reason.push_str(&format!("; need {need:.1} workers for {basis}"));
    }
    if kill {
        reason.push_str(&format!(
            "; p95 latency {} ms is longer than draining may take",
            w.latency_p95_ms
        ));
    }
    Decision {
        workers,
        rate,
        kill,
        required,
        trim,
        recommended: rec,
        rate_action,
        reason,
        state,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn window(throughput: f64, avg_workers: f64, utilization: f64) -> Window {
        let efficiency = if avg_workers > 0.0 {
            throughput / avg_workers
        } else {
            0.0
        };
        Window {
            period_s: 1.0,
            attempts: throughput as u64,
            delivered: throughput as u64,
            mix: Mix {
                ok: throughput as u64,
                ..Mix::default()
            },
            throughput,
            avg_workers,
            efficiency,
            utilization,
            busy_efficiency: efficiency / utilization.max(1e-9),
            latency_p95_ms: 50,
            ..Window::default()
        }
    }

    fn inputs(target: f64, workers: usize, w: Window) -> Inputs {
        Inputs {
            now_s: 100.0,
            target,
            workers,
            starting: 0,
            min_workers: 1,
            max_workers: 50,
            backlog: true,
            down_window_s: 5.0,
            drain_budget_s: 1.0,
            window: w,
        }
    }

    fn with_e(e: f64) -> State {
        State {
            e_busy: Some(e),
            ..State::default()
        }
    }

    fn pushback(mut w: Window, temp: u64) -> Window {
        w.mix.temp = temp;
        w.mix.ok = w.attempts - temp;
        w.delivered = w.mix.ok;
        w.pushback_rate = temp as f64 / w.attempts as f64;
        w
    }

    #[test]
    fn meter_integrates_workers_and_utilization() {
        let t0 = Instant::now();
        let mut m = Meter::new(t0, 2, 4);
        m.level(t0, 2, 8); // fully busy for 0.5 s
        m.level(t0 + Duration::from_millis(500), 4, 0); // 4 workers idle for 0.5 s
        for _ in 0..30 {
            m.attempt(OutcomeKind::Delivered, 10);
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
        assert!((w.busy_efficiency - 30.0).abs() < 1e-9);
    }

    #[test]
    fn meter_counts_the_reply_mix_per_worker_and_latency_percentiles() {
        let t0 = Instant::now();
        let mut m = Meter::new(t0, 2, 1);
        m.level(t0, 2, 2);
        for i in 0..100u32 {
            m.record(i % 2, OutcomeKind::Delivered, 250, Stage::FinalDot, i + 1);
        }
        m.record(0, OutcomeKind::Deferred, 451, Stage::FinalDot, 5);
        m.record(0, OutcomeKind::Deferred, 421, Stage::Greeting, 5);
        m.record(0, OutcomeKind::Deferred, 0, Stage::Connect, 5);
        m.record(0, OutcomeKind::Bounced, 550, Stage::Rcpt, 5);
        m.record(1, OutcomeKind::InDoubt, 0, Stage::FinalDot, 5);
        let w = m.take(t0 + Duration::from_secs(2));
        assert_eq!(
            w.mix,
            Mix {
                ok: 100,
                temp: 1,
                perm: 1,
                c421: 1,
                refused: 1,
                other: 1
            }
        );
        assert!((w.pushback_rate - 3.0 / 105.0).abs() < 1e-9);
        assert_eq!(w.per_worker, vec![(0, 25.0), (1, 25.0)]);
        assert!((w.failure_rate - 5.0 / 105.0).abs() < 1e-9);
        assert!(w.latency_p50_ms <= w.latency_p95_ms && w.latency_p95_ms <= w.latency_p99_ms);
        assert_eq!(w.latency_p99_ms, 99);
        // the next window starts empty
        let w2 = m.take(t0 + Duration::from_secs(3));
        assert_eq!(w2.attempts, 0);
        assert!(w2.per_worker.is_empty());
    }

    /// Pacing-induced idleness never reads as slowness: the same fleet, paced to a quarter of
    /// its capacity or with an empty queue, measures the same busy-worker efficiency.
    #[test]
    fn pacing_and_an_empty_queue_do_not_read_as_slowness() {
        let t0 = Instant::now();
        let busy = |paced_share: f64| {
            // 10 workers x 1 session; each busy attempt takes 50 ms (20/s per busy worker).
            let mut m = Meter::new(t0, 10, 1);
            let busy_sessions = (10.0 * paced_share).round() as usize;
            m.level(t0, 10, busy_sessions);
            for _ in 0..(busy_sessions * 20) {
                m.attempt(OutcomeKind::Delivered, 50);
            }
            m.take(t0 + Duration::from_secs(1))
        };
        let full = busy(1.0);
        let paced = busy(0.25);
        assert!((full.busy_efficiency - 20.0).abs() < 1e-9);
        assert!((paced.busy_efficiency - 20.0).abs() < 1e-9, "{paced:?}");
        assert!(paced.efficiency < full.efficiency);
        // and decide does not add workers for the paced pool: it needs 50*1.1/20 = 2.75 -> 3
        let d = decide(&inputs(50.0, 10, paced), &State::default());
        assert_eq!(d.state.e_busy, Some(20.0));
        assert_eq!(d.recommended, 3, "{}", d.reason);
        // an empty queue with no attempts leaves the estimate alone and goes to min_workers
        let mut i = inputs(50.0, 10, busy(0.0));
        i.backlog = false;
        let d = decide(&i, &with_e(20.0));
        assert_eq!(d.state.e_busy, Some(20.0));
        assert_eq!(d.workers, 1, "{}", d.reason);
    }

    #[test]
    fn feed_forward_sizes_from_busy_worker_efficiency() {
        // 4 workers pacing at 100/s, each only 25% busy: a busy worker does 100/s.
        let d = decide(
            &inputs(100.0, 4, window(100.0, 4.0, 0.25)),
            &State::default(),
        );
        assert_eq!(d.state.e_busy, Some(100.0));
        assert!((d.required - HEADROOM).abs() < 1e-9);
        assert_eq!(d.workers, 2, "{}", d.reason);
        assert!(d.reason.starts_with("scale down 4 -> 2"), "{}", d.reason);
        assert!((d.rate - 100.0).abs() < 1e-9);
    }

    #[test]
    fn scales_up_at_once() {
        // 2 saturated workers deliver 40/s: 20/s each, target 200/s needs 11 (+ trim).
        let d = decide(&inputs(200.0, 2, window(40.0, 2.0, 1.0)), &State::default());
        assert!(d.workers >= 11, "{}", d.reason);
        assert!(d.reason.starts_with("scale up 2 -> "), "{}", d.reason);
    }

    #[test]
    fn a_slowdown_is_answered_at_the_next_tick_and_explained() {
        // E_busy was 20/s; latency rose 10x: 20 saturated workers now do 40/s.
        let mut s = with_e(20.0);
        s.last_p50_ms = Some(50);
        let mut w = window(40.0, 20.0, 1.0);
        w.latency_p50_ms = 500;
        let d = decide(&inputs(400.0, 20, w), &s);
        assert_eq!(d.state.e_busy, Some(2.0), "fast drop, no smoothing");
        assert_eq!(d.workers, 50, "clamped at max: {}", d.reason);
        assert!(
            d.reason.contains(
                "efficiency of a busy worker fell 90% after latency rose (p50 50 -> 500 ms)"
            ),
            "{}",
            d.reason
        );
    }

    #[test]
    fn a_rise_in_efficiency_is_smoothed() {
        let d = decide(&inputs(100.0, 10, window(100.0, 10.0, 0.25)), &with_e(20.0));
        let e = d.state.e_busy.unwrap();
        assert!(e > 20.0 && e < 40.0, "{e}");
    }

    #[test]
    fn scale_down_only_to_the_highest_recent_recommendation() {
        let mut s = with_e(10.0);
        s.recent = VecDeque::from(vec![(97.0, 12), (98.0, 9), (99.0, 8)]);
        // now only 6 needed, but 12 was recommended recently: hold at 12.
        let d = decide(&inputs(50.0, 12, window(50.0, 12.0, 50.0 / 120.0)), &s);
        assert_eq!(d.workers, 12, "{}", d.reason);
        // once 12 is older than the window, down to the highest of the rest (9)
        let mut i = inputs(50.0, 12, window(50.0, 12.0, 50.0 / 120.0));
        i.now_s = 102.5;
        let d = decide(&i, &s);
        assert_eq!(d.workers, 9, "{}", d.reason);
        assert!(d.reason.starts_with("scale down 12 -> 9"), "{}", d.reason);
        assert!(!d.kill);
    }

    #[test]
    fn dead_band_holds_small_changes() {
        // 40 workers: the band is 2. One worker too many or too few: hold.
        let mut s = with_e(10.0);
        s.recent = VecDeque::from(vec![(95.0, 39)]);
        let target = 39.0 * 10.0 / HEADROOM - 1.0; // needs 39
        let d = decide(
            &inputs(target, 40, window(target, 40.0, target / 400.0)),
            &s,
        );
        assert_eq!(d.recommended, 39);
        assert_eq!(d.workers, 40, "{}", d.reason);
        assert!(d.reason.starts_with("hold 40"), "{}", d.reason);
        // at 20 workers the band is 1: one too many goes
        let target = 19.0 * 10.0 / HEADROOM - 1.0;
        let mut s = with_e(10.0);
        s.recent = VecDeque::from(vec![(95.0, 19)]);
        let d = decide(
            &inputs(target, 20, window(target, 20.0, target / 200.0)),
            &s,
        );
        assert_eq!(d.workers, 19, "{}", d.reason);
    }

    #[test]
    fn clamps_to_bounds() {
        let mut i = inputs(10_000.0, 2, window(40.0, 2.0, 1.0));
        i.max_workers = 8;
        assert_eq!(decide(&i, &State::default()).workers, 8);
        let mut i = inputs(1.0, 5, window(1.0, 5.0, 0.01));
        i.min_workers = 3;
        i.backlog = false;
        assert_eq!(decide(&i, &with_e(20.0)).workers, 3);
        // a reload that lowered max_workers below the pool
        let mut i = inputs(100.0, 12, window(100.0, 12.0, 0.5));
        i.max_workers = 6;
        let d = decide(&i, &with_e(10.0));
        assert_eq!(d.workers, 6, "{}", d.reason);
    }

    #[test]
    fn pi_trim_adds_workers_when_throughput_falls_short() {
        // E_busy says 10 workers suffice for 100/s, but only 80/s came through with work waiting.
        // (a busy worker still does 10/s: U = 80 / 110)
        let mut i = inputs(100.0, 11, window(80.0, 11.0, 80.0 / 110.0));
        let s = with_e(10.0);
        let mut d = decide(&i, &s);
        assert!(d.trim > 0.0, "{}", d.reason);
        // the same shortfall while the pool is still below the feed-forward need (start-up,
        // a step up) is left to the feed-forward: no trim, no integral
        let mut j = inputs(100.0, 5, window(40.0, 5.0, 0.8));
        j.window.utilization = 40.0 / 50.0;
        let dj = decide(&j, &s);
        assert_eq!((dj.trim, dj.state.integral), (0.0, 0.0), "{}", dj.reason);
        // keeps integrating while the shortfall lasts
        let first = d.state.integral;
        for k in 0..3 {
            i.now_s += 1.0 + k as f64;
            d = decide(&i, &d.state);
        }
        assert!(d.state.integral > first);
        assert!(d.reason.contains("trim +"), "{}", d.reason);
    }

    #[test]
    fn a_step_down_does_not_wind_the_trim_down() {
        // Just after the target halved, the old rate's jobs end: 600/s measured against 300/s.
        let d = decide(&inputs(300.0, 45, window(600.0, 45.0, 0.9)), &with_e(14.0));
        assert_eq!((d.trim, d.state.integral), (0.0, 0.0), "{}", d.reason);
        assert_eq!(d.recommended, 22, "{}", d.reason);
    }

    #[test]
    fn no_trim_when_the_queue_is_empty() {
        let mut i = inputs(100.0, 11, window(60.0, 11.0, 0.5));
        i.backlog = false;
        let d = decide(&i, &with_e(10.0));
        assert_eq!(d.trim, 0.0);
        assert_eq!(d.state.integral, 0.0);
    }

    #[test]
    fn anti_windup_when_clamped_at_max_or_starting() {
        // The pool is at max and still short: the integral must not grow.
        let mut i = inputs(1000.0, 8, window(160.0, 8.0, 1.0));
        i.max_workers = 8;
        let mut s = with_e(20.0);
        for k in 0..10 {
            i.now_s = 100.0 + k as f64;
            s = decide(&i, &s).state;
        }
        assert_eq!(s.integral, 0.0, "wound up at the clamp");
        // workers still starting: capacity is on its way, no integration either
        let mut i = inputs(100.0, 12, window(50.0, 6.0, 1.0));
        i.starting = 6;
        let d = decide(&i, &with_e(10.0));
        assert_eq!(d.state.integral, 0.0);
        // and an existing integral leaks when the error is small
        let i = inputs(100.0, 12, window(99.5, 12.0, 0.8));
        let mut s = with_e(10.0);
        s.integral = 10.0;
        let d = decide(&i, &s);
        assert!(d.state.integral < 10.0 && d.state.integral > 9.0);
    }

    #[test]
    fn after_a_slowdown_there_is_no_wind_up() {
        // 20 ticks of a 10x slowdown at the max_workers clamp, then the receiver is fast again:
        // the recommendation comes straight back to the feed-forward need.
        let mut s = with_e(20.0);
        let mut i = inputs(400.0, 50, window(100.0, 50.0, 1.0));
        for k in 0..20 {
            i.now_s = 100.0 + k as f64;
            s = decide(&i, &s).state;
        }
        assert_eq!(s.integral, 0.0);
        // fast again: no trim at all (the integral did not wind up) and, as the efficiency
        // estimate catches up, the recommendation falls to the feed-forward need of 22-23
        let mut d = None;
        for k in 0..8 {
            let mut i = inputs(400.0, 50, window(400.0, 50.0, 400.0 / 20.0 / 50.0));
            i.now_s = 130.0 + k as f64;
            let dk = decide(&i, &s);
            assert!(dk.trim.abs() < 0.5, "{}", dk.reason);
            s = dk.state.clone();
            d = Some(dk);
        }
        let d = d.unwrap();
        assert!(d.recommended <= 23, "{} ({})", d.recommended, d.reason);
    }

    #[test]
    fn backpressure_cuts_the_rate_at_once_and_regrows_after_a_clean_run() {
        let s = with_e(20.0);
        // 20% 4xx: cut in this very decision
        let i = inputs(400.0, 22, pushback(window(400.0, 22.0, 0.9), 80));
        let d = decide(&i, &s);
        assert_eq!(d.rate_action, RateAction::Cut);
        assert!((d.rate - 200.0).abs() < 1e-9);
        assert!(
            d.reason.contains("rate cut 400.0 -> 200.0/s"),
            "{}",
            d.reason
        );
        // workers follow the lower rate (down via the window, so not at once)
        assert!(d.recommended < 22);
        // the surge goes on a second later: cut again
        let mut i2 = inputs(400.0, 22, pushback(window(200.0, 22.0, 0.5), 40));
        i2.now_s = 101.0;
        let d2 = decide(&i2, &d.state);
        assert!((d2.rate - 100.0).abs() < 1e-9, "{}", d2.reason);
        // a cut 0.1 s later (continuous mode) is held off
        let mut i3 = i2.clone();
        i3.now_s = 101.1;
        i3.window.period_s = 0.1;
        let d3 = decide(&i3, &d2.state);
        assert!((d3.rate - 100.0).abs() < 1e-9);
        // clean windows: held for CLEAN_RUN_S, then grows, never above the target
        let mut s = d2.state;
        let mut rates = Vec::new();
        for k in 0..30 {
            let mut c = inputs(400.0, 22, window(100.0, 22.0, 0.3));
            c.now_s = 102.0 + k as f64;
            let d = decide(&c, &s);
            rates.push(d.rate);
            s = d.state;
        }
        assert!(
            rates[..4].iter().all(|&r| (r - 100.0).abs() < 1e-9),
            "{rates:?}"
        );
        assert!(rates[6] > 100.0, "{rates:?}");
        assert!(rates.windows(2).all(|p| p[1] >= p[0]));
        assert!((rates[29] - 400.0).abs() < 1e-9, "{rates:?}");
    }

    #[test]
    fn backpressure_needs_a_surge_not_a_few_failures() {
        // 2 of 400 (0.5%): no cut; 3% : no cut but the clean run restarts
        let d = decide(
            &inputs(400.0, 22, pushback(window(400.0, 22.0, 0.9), 2)),
            &with_e(20.0),
        );
        assert_eq!(d.rate_action, RateAction::Hold);
        let mut s = with_e(20.0);
        s.factor = 0.5;
        s.clean_since_s = Some(90.0);
        let d = decide(
            &inputs(400.0, 22, pushback(window(200.0, 22.0, 0.9), 6)),
            &s,
        );
        assert_eq!(d.rate_action, RateAction::Hold);
        assert_eq!(d.state.clean_since_s, None);
        assert!((d.rate - 200.0).abs() < 1e-9);
        // refused connections and 421 count as pushback too
        let mut w = window(100.0, 10.0, 0.9);
        w.mix.refused = 5;
        w.mix.c421 = 5;
        w.mix.ok = 90;
        w.pushback_rate = 0.1;
        let d = decide(&inputs(100.0, 10, w), &with_e(20.0));
        assert_eq!(d.rate_action, RateAction::Cut);
    }

    #[test]
    fn kills_instead_of_draining_when_latency_is_long() {
        let mut s = with_e(10.0);
        s.recent = VecDeque::from(vec![(90.0, 30)]);
        let mut w = window(100.0, 30.0, 0.3);
        w.latency_p95_ms = 5000;
        let d = decide(&inputs(100.0, 30, w.clone()), &s);
        assert!(d.workers < 30);
        assert!(d.kill, "{}", d.reason);
        assert!(d.reason.starts_with("kill 30 -> "), "{}", d.reason);
        // short latency: drain
        w.latency_p95_ms = 40;
        let d = decide(&inputs(100.0, 30, w), &s);
        assert!(d.workers < 30 && !d.kill, "{}", d.reason);
    }

    #[test]
    fn idle_pool_with_no_work_goes_to_min_workers() {
        let mut i = inputs(100.0, 6, window(0.0, 6.0, 0.0));
        i.backlog = false;
        let d = decide(&i, &with_e(20.0));
        assert_eq!(d.workers, 1, "{}", d.reason);
        assert!(!d.kill);
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

    #[test]
    fn target_changes_are_explained() {
        let mut s = with_e(20.0);
        s.last_target = Some(200.0);
        let d = decide(&inputs(400.0, 12, window(200.0, 12.0, 0.8)), &s);
        assert!(d.reason.starts_with("scale up 12 -> "), "{}", d.reason);
        assert!(
            d.reason.contains("target 200.0/s -> 400.0/s"),
            "{}",
            d.reason
        );
        assert!((d.rate - 400.0).abs() < 1e-9);
    }
}
