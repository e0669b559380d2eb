//! The retry policy: when a job that failed temporarily is tried again ([`delay`]), and how many
//! attempts it gets before it ends `expired` ([`limit`], claims 10, 19, 29, 38, 50, 51-59).
//!
//! # Theory of operation
//!
//! ## Schedule
//! After attempt `k` ends in a 4xx (or in doubt), the job is deferred for
//! `min_interval * 2^(k-1)`, capped at `max_interval`, times a jitter factor uniform in
//! [0.9, 1.1) so that the retries of one burst do not come back together. The spool stores the
//! attempt count, `next_attempt_at` and `first_attempt_at`, so a restart changes none of them,
//! and every attempt carries the Message-ID fixed at ingestion and the campaign's envelope
//! sender (which the spool refuses to change under a running campaign). A job whose age (time
//! since its first attempt ended) reaches `max_age` expires whatever the limit says.
//!
//! ## The retry limit
//! A job whose attempt `k` ends in a temporary failure is retried while `k < limit`, and ends
//! `expired` otherwise, with that attempt's reply kept as its reason (spool `last_code`,
//! `last_text`; the delivery-log line says `expired`). With `adapt = []` the limit is
//! `max_attempts`, the fixed limit of every peer. Otherwise [`limit`] computes it from what the
//! control loop measured over its last window, in this order:
//!
//! 1. **Stepped part** `B` (claims 54-57), kept from tick to tick and starting at
//!    `max_attempts`. Each enabled input votes:
//!    - `workers`: the time-average N of allocated workers. `N > workers_high` votes -1,
//!      `N < workers_low` votes +1. Many workers mean the pool is stretched to meet the target,
//!      and every retry takes a session a first attempt could have used; few workers mean spare
//!      capacity, where retries are cheap.
//!    - `failure_rate`: the share F of attempts that failed, once the window holds at least
//!      [`MIN_SAMPLE`] attempts (a handful of attempts says nothing). `F > failure_high` votes
//!      -1, `F < failure_low` votes +1. A receiver that refuses much of what it is sent should
//!      not be offered more retries; when failures are rare, each one is likely a passing
//!      hiccup worth another try.
//!
//!    `B = clamp(B_previous + votes, min_attempts, max_attempts)`: at most one step per input
//!    per tick. Between the two values of an input (the dead band) its vote is 0 and `B` holds:
//!    this is the hysteresis that keeps the limit from flapping when a measurement hovers around
//!    one threshold, and it gives `B` memory: after a run of bad windows the limit stays low until
//!    the input is really good (below the *second* value), not merely no longer bad.
//! 2. **Utilization** (claim 59): `P = B * min(1, utilization_ref / U)`. Up to
//!    `utilization_ref` the limit is `B`; above it, the limit is inversely proportional to the
//!    utilization U of the workers' sessions. A busy pool has no spare sessions for retries; the
//!    factor is recomputed every tick (no memory), so the limit comes back as soon as load falls.
//! 3. **Stage** (claim 58), a factor `1 - stage_weight * s` for each stage s in [0, 1]:
//!    - per campaign, s = share of the campaign's jobs with a final state. Late in a campaign
//!      the jobs still failing are the hard ones, and retrying them keeps the campaign open;
//!    - per job, s = age / `max_age`. A job that has been failing for most of its lifetime is
//!      unlikely to get through in what is left of it. The job's attempt number is the other
//!      axis of its stage: it is what the limit is compared with, so it is not fed in again (a
//!      limit that fell with the attempt number would only be a smaller `max_attempts`).
//!
//!    The per-campaign factor is applied at the tick (with the share of all campaigns, for the
//!    control log) and again per job with the job's own campaign; the per-job factor only when a
//!    job's outcome is decided.
//! 4. `value = clamp(floor(P * stage factors), min_attempts, max_attempts)`.
//!
//! [`limit`] is pure: the previous `B` is one of its [`Inputs`], and it returns the new one. The
//! loop calls it once per tick (no job) and logs the value, `B`, the inputs and the reasons in the
//! control log; when a deferred outcome comes back it calls it again with the same tick inputs
//! plus the job's stage, which gives the same `B` and applies the per-job factor.

use std::collections::HashMap;
use std::time::Duration;

use serde::Serialize;

use crate::config::RetryConfig;

/// Fewer attempts than this in a window leave the failure-rate vote at 0.
pub const MIN_SAMPLE: u64 = 20;

/// The names accepted in `[retry] adapt`, in claim 10's order of inputs.
pub const ADAPT_NAMES: &[&str] = &["workers", "failure_rate", "stage", "utilization"];

/// Delay before the attempt after attempt number `attempt`: `min_interval * 2^(attempt-1)`,
/// capped at `max_interval`, times `0.9 + 0.2 * jitter01` (so +-10% for `jitter01` in [0, 1)).
pub fn delay(cfg: &RetryConfig, attempt: u32, jitter01: f64) -> Duration {
    let base = cfg.min_interval.as_secs_f64() * 2f64.powi(attempt.saturating_sub(1).min(30) as i32);
    let capped = base.min(cfg.max_interval.as_secs_f64()).max(0.0);
    Duration::from_secs_f64(capped * (0.9 + 0.2 * jitter01.clamp(0.0, 1.0)))
}

/// Which measurements adapt the limit (`[retry] adapt`); all false is a fixed limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Adapt {
    /// Allocated workers (claims 54, 55).
    pub workers: bool,
    /// Delivery failure rate (claims 56, 57).
    pub failure_rate: bool,
    /// Stage of delivery, per job and per campaign (claim 58).
    pub stage: bool,
    /// Utilization of the workers (claim 59).
    pub utilization: bool,
}

impl Adapt {
    /// Parses the names of `[retry] adapt`; a repeated name counts once. The error names the
    /// unknown entry.
    pub fn parse<S: AsRef<str>>(names: &[S]) -> Result<Adapt, String> {
        let mut a = Adapt::default();
        for n in names {
            match n.as_ref() {
                "workers" => a.workers = true,
                "failure_rate" => a.failure_rate = true,
                "stage" => a.stage = true,
                "utilization" => a.utilization = true,
                other => {
                    return Err(format!(
                        "unknown input {other:?}; use any of \"workers\", \"failure_rate\", \"stage\", \"utilization\" (or [] for a fixed limit)"
                    ));
                }
            }
        }
        Ok(a)
    }

    /// The enabled inputs' names, in [`ADAPT_NAMES`] order.
    pub fn names(&self) -> Vec<&'static str> {
        let on = [
            self.workers,
            self.failure_rate,
            self.stage,
            self.utilization,
        ];
        ADAPT_NAMES
            .iter()
            .zip(on)
            .filter(|(_, on)| *on)
            .map(|(n, _)| *n)
            .collect()
    }

    /// No input enabled: the limit is always `max_attempts`.
    pub fn is_fixed(&self) -> bool {
        *self == Adapt::default()
    }
}

/// The configured policy (from `[retry]`).
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// Lower bound of the limit.
    pub min_attempts: u32,
    /// Upper bound of the limit, and its starting value.
    pub max_attempts: u32,
    /// Which inputs are used.
    pub adapt: Adapt,
    /// More allocated workers than this lower the limit by one step per tick.
    pub workers_high: u32,
    /// Fewer allocated workers than this raise it by one step per tick.
    pub workers_low: u32,
    /// A failure rate above this lowers the limit by one step per tick.
    pub failure_high: f64,
    /// A failure rate below this raises it by one step per tick.
    pub failure_low: f64,
    /// Utilization above which the limit falls as `utilization_ref / U`.
    pub utilization_ref: f64,
    /// How much a finished stage (campaign all done, job at `max_age`) takes off, in [0, 1].
    pub stage_weight: f64,
    /// `max_age` in seconds (the per-job stage is age / max_age).
    pub max_age_s: f64,
}

impl Policy {
    /// The policy `[retry]` describes.
    pub fn from_config(c: &RetryConfig) -> Policy {
        Policy {
            min_attempts: c.min_attempts,
            max_attempts: c.max_attempts,
            adapt: c.adapt,
            workers_high: c.workers_high,
            workers_low: c.workers_low,
            failure_high: c.failure_high,
            failure_low: c.failure_low,
            utilization_ref: c.utilization_ref,
            stage_weight: c.stage_weight,
            max_age_s: c.max_age.as_secs_f64(),
        }
    }
}

/// Where one job stands, for the per-job stage factor.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct JobStage {
    /// The attempt that just ended (1-based).
    pub attempt: u32,
    /// Seconds since the job's first attempt ended.
    pub age_s: f64,
}

/// What the limit is computed from: the last window's measurements and the previous step.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Inputs {
    /// The stepped part `B` from the previous tick (`max_attempts` at the start).
    pub previous: u32,
    /// Time-average of allocated workers over the window.
    pub workers: f64,
    /// Share of the window's attempts that failed (deferred, bounced or in doubt).
    pub failure_rate: f64,
    /// Attempts that ended in the window (the failure rate's sample size).
    pub attempts: u64,
    /// Busy session-time / allocated session-time over the window, in [0, 1].
    pub utilization: f64,
    /// Share of jobs with a final state: of all campaigns at the tick, of the job's campaign
    /// for a job.
    pub share_done: f64,
    /// The job whose outcome is being decided; `None` at a control tick.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub job: Option<JobStage>,
}

impl Inputs {
    /// The inputs before any measurement: no votes, factors of 1.
    pub fn initial(policy: &Policy) -> Inputs {
        Inputs {
            previous: policy.max_attempts,
            workers: f64::from(policy.workers_low.max(1)),
            failure_rate: 0.0,
            attempts: 0,
            utilization: 0.0,
            share_done: 0.0,
            job: None,
        }
    }
}

/// The decision.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Limit {
    /// A job whose attempt `k` ended in a temporary failure is retried while `k < value`.
    pub value: u32,
    /// The stepped part `B`, to pass as [`Inputs::previous`] at the next tick.
    pub base: u32,
    /// Why, one entry per input that moved it (empty when nothing did).
    pub reasons: Vec<String>,
}

impl Limit {
    /// Whether a job whose attempt `attempt` just failed temporarily has used its attempts.
    pub fn expires(&self, attempt: u32) -> bool {
        attempt >= self.value
    }

    /// The reasons in one line.
    pub fn reason(&self) -> String {
        if self.reasons.is_empty() {
            "no input moved the limit".to_string()
        } else {
            self.reasons.join("; ")
        }
    }
}

/// The retry limit for `inp` under `policy` (see the module documentation for how and why).
pub fn limit(inp: &Inputs, policy: &Policy) -> Limit {
    let (lo, hi) = (
        policy.min_attempts.min(policy.max_attempts),
        policy.max_attempts,
    );
    let a = policy.adapt;
    if a.is_fixed() {
        return Limit {
            value: hi,
            base: hi,
            reasons: vec![format!("fixed limit: max_attempts {hi}")],
        };
    }
    let mut reasons = Vec::new();
    let mut votes: i64 = 0;
    if a.workers {
        if inp.workers > f64::from(policy.workers_high) {
            votes -= 1;
            reasons.push(format!(
                "workers {:.1} > workers_high {}: -1",
                inp.workers, policy.workers_high
            ));
        } else if inp.workers < f64::from(policy.workers_low) {
            votes += 1;
            reasons.push(format!(
                "workers {:.1} < workers_low {}: +1",
                inp.workers, policy.workers_low
            ));
        }
    }
    if a.failure_rate && inp.attempts >= MIN_SAMPLE {
        if inp.failure_rate > policy.failure_high {
            votes -= 1;
            reasons.push(format!(
                "failure_rate {:.3} > failure_high {}: -1",
                inp.failure_rate, policy.failure_high
            ));
        } else if inp.failure_rate < policy.failure_low {
            votes += 1;
            reasons.push(format!(
                "failure_rate {:.3} < failure_low {}: +1",
                inp.failure_rate, policy.failure_low
            ));
        }
    }
    let base = (i64::from(inp.previous) + votes).clamp(i64::from(lo), i64::from(hi)) as u32;
    let mut p = f64::from(base);
    if a.utilization && inp.utilization > policy.utilization_ref {
        let f = policy.utilization_ref / inp.utilization;
        p *= f;
        reasons.push(format!(
            "utilization {:.2} > utilization_ref {}: x{f:.2}",
            inp.utilization, policy.utilization_ref
        ));
    }
    if a.stage {
        let share = inp.share_done.clamp(0.0, 1.0);
        if share > 0.0 && policy.stage_weight > 0.0 {
            let f = 1.0 - policy.stage_weight * share;
            p *= f;
            reasons.push(format!("campaign {:.0}% final: x{f:.2}", share * 100.0));
        }
        if let Some(job) = inp.job {
            let s = if policy.max_age_s > 0.0 {
                (job.age_s / policy.max_age_s).clamp(0.0, 1.0)
            } else {
                1.0
            };
            if s > 0.0 && policy.stage_weight > 0.0 {
                let f = 1.0 - policy.stage_weight * s;
                p *= f;
                reasons.push(format!("job age {:.0}% of max_age: x{f:.2}", s * 100.0));
            }
        }
    }
    // The epsilon keeps 5 * 0.5 / 0.5 at 5 whatever the float rounding.
    let raw = (p + 1e-9).floor().max(0.0) as u32;
    let value = raw.clamp(lo, hi);
    if raw < lo {
        reasons.push(format!("raised to min_attempts {lo}"));
    }
    Limit {
        value,
        base,
        reasons,
    }
}

/// What the main loop keeps between calls: the policy, the last tick's inputs and decision, and
/// each campaign's share of final jobs. Only bookkeeping; every decision is [`limit`].
#[derive(Debug, Clone)]
pub struct Tracker {
    /// The configured policy.
    pub policy: Policy,
    /// The inputs of the last tick (with `job: None`).
    pub inputs: Inputs,
    /// The decision of the last tick.
    pub last: Limit,
    /// Share of final jobs per campaign id, as of the last tick.
    pub shares: HashMap<u64, f64>,
}

impl Tracker {
    /// A tracker at the start of a run.
    pub fn new(policy: Policy) -> Tracker {
        let inputs = Inputs::initial(&policy);
        let last = limit(&inputs, &policy);
        Tracker {
            policy,
            inputs,
            last,
            shares: HashMap::new(),
        }
    }

    /// A control tick: decides from the window's measurements and remembers the result.
    pub fn tick(&mut self, inputs: Inputs) -> &Limit {
        self.last = limit(&inputs, &self.policy);
        self.inputs = inputs;
        &self.last
    }

    /// The limit for one job of `campaign_id` whose attempt `attempt` just failed, `age_s`
    /// after its first attempt: the last tick's inputs plus the job's stage.
    pub fn for_job(&self, campaign_id: u64, attempt: u32, age_s: f64) -> Limit {
        if self.policy.adapt.is_fixed() {
            return self.last.clone();
        }
        let mut inp = self.inputs.clone();
        if let Some(s) = self.shares.get(&campaign_id) {
            inp.share_done = *s;
        }
        inp.job = Some(JobStage { attempt, age_s });
        limit(&inp, &self.policy)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(adapt: &[&str]) -> Policy {
        Policy {
            min_attempts: 2,
            max_attempts: 10,
            adapt: Adapt::parse(adapt).unwrap(),
            workers_high: 6,
            workers_low: 2,
            failure_high: 0.2,
            failure_low: 0.05,
            utilization_ref: 0.5,
            stage_weight: 0.5,
            max_age_s: 1000.0,
        }
    }

    /// Neutral inputs: every input inside its dead band, no stage, utilization at the knee.
    fn neutral(previous: u32) -> Inputs {
        Inputs {
            previous,
            workers: 4.0,
            failure_rate: 0.1,
            attempts: 100,
            utilization: 0.5,
            share_done: 0.0,
            job: None,
        }
    }

    /// Claim 54: more allocated workers than the first value reduces the limit.
    #[test]
    fn claim_54_workers_above_first_value_reduce_the_limit() {
        let p = policy(&["workers"]);
        // (workers, previous) -> value
        for (workers, prev, want) in [
            (7.0, 10, 9),
            (6.5, 5, 4),
            (20.0, 3, 2),
            (6.0, 5, 5), // equal to the first value: not exceeding, holds
        ] {
            let l = limit(
                &Inputs {
                    workers,
                    ..neutral(prev)
                },
                &p,
            );
            assert_eq!(
                (l.value, l.base),
                (want, want),
                "workers {workers} prev {prev}"
            );
        }
        assert!(
            limit(
                &Inputs {
                    workers: 7.0,
                    ..neutral(10)
                },
                &p
            )
            .reason()
            .contains("workers 7.0 > workers_high 6: -1")
        );
    }

    /// Claim 55: fewer allocated workers than the second value increases the limit.
    #[test]
    fn claim_55_workers_below_second_value_increase_the_limit() {
        let p = policy(&["workers"]);
        for (workers, prev, want) in [(1.0, 5, 6), (1.9, 2, 3), (0.0, 9, 10), (2.0, 5, 5)] {
            let l = limit(
                &Inputs {
                    workers,
                    ..neutral(prev)
                },
                &p,
            );
            assert_eq!(l.value, want, "workers {workers} prev {prev}");
        }
    }

    /// Between the two values the limit holds wherever it is: hysteresis, no flapping.
    #[test]
    fn dead_band_between_the_two_values_holds() {
        let p = policy(&["workers", "failure_rate"]);
        // A pool that went up to 8 workers, then settles at 4: the limit stays down.
        let mut b = 10;
        for workers in [8.0, 8.0, 8.0, 4.0, 5.0, 3.0, 4.0] {
            b = limit(
                &Inputs {
                    workers,
                    ..neutral(b)
                },
                &p,
            )
            .base;
        }
        assert_eq!(b, 7);
        // Only falling below the second value brings it back.
        b = limit(
            &Inputs {
                workers: 1.0,
                ..neutral(b)
            },
            &p,
        )
        .base;
        assert_eq!(b, 8);
        // A measurement hovering around one threshold moves the limit one way only.
        let mut b = 10;
        for workers in [6.1, 5.9, 6.1, 5.9] {
            b = limit(
                &Inputs {
                    workers,
                    ..neutral(b)
                },
                &p,
            )
            .base;
        }
        assert_eq!(b, 8);
    }

    /// Claim 56: a failure rate above the first value decreases the limit.
    #[test]
    fn claim_56_failure_rate_above_first_value_decreases_the_limit() {
        let p = policy(&["failure_rate"]);
        for (rate, prev, want) in [(0.5, 10, 9), (0.21, 4, 3), (1.0, 2, 2), (0.2, 6, 6)] {
            let l = limit(
                &Inputs {
                    failure_rate: rate,
                    ..neutral(prev)
                },
                &p,
            );
            assert_eq!(l.value, want, "rate {rate} prev {prev}");
        }
        // Too few attempts to judge: no vote.
        let l = limit(
            &Inputs {
                failure_rate: 1.0,
                attempts: MIN_SAMPLE - 1,
                ..neutral(10)
            },
            &p,
        );
        assert_eq!(l.value, 10);
    }

    /// Claim 57: a failure rate below the second value increases the limit.
    #[test]
    fn claim_57_failure_rate_below_second_value_increases_the_limit() {
        let p = policy(&["failure_rate"]);
        for (rate, prev, want) in [(0.0, 5, 6), (0.049, 9, 10), (0.0, 10, 10), (0.05, 5, 5)] {
            let l = limit(
                &Inputs {
                    failure_rate: rate,
                    ..neutral(prev)
                },
                &p,
            );
            assert_eq!(l.value, want, "rate {rate} prev {prev}");
        }
    }

    /// Claim 10 option 3: workers and failure rate together; their votes add up.
    #[test]
    fn workers_and_failure_rate_votes_add() {
        let p = policy(&["workers", "failure_rate"]);
        for (workers, rate, want) in [
            (8.0, 0.5, 3), // both bad: -2
            (8.0, 0.0, 5), // opposed: hold
            (1.0, 0.0, 7), // both good: +2
            (4.0, 0.5, 4),
        ] {
            let l = limit(
                &Inputs {
                    workers,
                    failure_rate: rate,
                    ..neutral(5)
                },
                &p,
            );
            assert_eq!(l.value, want, "workers {workers} rate {rate}");
        }
    }

    /// Claim 58: the limit decreases in later stages of delivery, per campaign and per job.
    #[test]
    fn claim_58_later_stages_lower_the_limit() {
        let p = policy(&["stage"]);
        // Per campaign: share of final jobs.
        let by_share: Vec<u32> = [0.0, 0.25, 0.5, 0.75, 1.0]
            .iter()
            .map(|&s| {
                limit(
                    &Inputs {
                        share_done: s,
                        ..neutral(10)
                    },
                    &p,
                )
                .value
            })
            .collect();
        assert_eq!(by_share, vec![10, 8, 7, 6, 5]);
        // Per job: age relative to max_age (1000 s here), on top of the campaign's stage.
        let by_age: Vec<u32> = [0.0, 250.0, 500.0, 999.0, 5000.0]
            .iter()
            .map(|&age_s| {
                limit(
                    &Inputs {
                        share_done: 0.5,
                        job: Some(JobStage { attempt: 2, age_s }),
                        ..neutral(10)
                    },
                    &p,
                )
                .value
            })
            .collect();
        assert_eq!(by_age, vec![7, 6, 5, 3, 3]);
        assert!(by_age.windows(2).all(|w| w[1] <= w[0]));
        let l = limit(
            &Inputs {
                share_done: 0.5,
                job: Some(JobStage {
                    attempt: 2,
                    age_s: 500.0,
                }),
                ..neutral(10)
            },
            &p,
        );
        assert_eq!(
            l.reason(),
            "campaign 50% final: x0.75; job age 50% of max_age: x0.75"
        );
        // A job at attempt 5 with limit 5 expires; the same job younger does not.
        assert!(l.expires(5));
        assert!(!l.expires(4));
    }

    /// Claim 59: above the reference, limit x utilization stays constant (inverse proportion).
    #[test]
    fn claim_59_limit_inversely_proportional_to_utilization() {
        let p = policy(&["utilization"]);
        for (u, want) in [
            (0.1, 10),
            (0.5, 10),
            (0.625, 8),
            (0.8, 6),
            (5.0 / 6.0, 6),
            (1.0, 5),
        ] {
            let l = limit(
                &Inputs {
                    utilization: u,
                    ..neutral(10)
                },
                &p,
            );
            assert_eq!(l.value, want, "utilization {u}");
            if u >= 0.5 {
                // value = floor(10 * 0.5 / u): the product with u is the constant 5, less
                // what the rounding down takes.
                let product = f64::from(l.value) * u;
                assert!(product <= 5.0 + 1e-9 && product > 5.0 - u, "u {u}");
            }
        }
        // It scales the stepped part, not the configured maximum.
        let l = limit(
            &Inputs {
                utilization: 1.0,
                ..neutral(8)
            },
            &policy(&["utilization"]),
        );
        assert_eq!((l.value, l.base), (4, 8));
    }

    /// The limit never leaves [min_attempts, max_attempts], whatever the inputs say.
    #[test]
    fn bounded_by_min_and_max_attempts() {
        let all = policy(&["workers", "failure_rate", "stage", "utilization"]);
        let worst = Inputs {
            previous: 2,
            workers: 100.0,
            failure_rate: 1.0,
            attempts: 1000,
            utilization: 1.0,
            share_done: 1.0,
            job: Some(JobStage {
                attempt: 9,
                age_s: 1e9,
            }),
        };
        let l = limit(&worst, &all);
        assert_eq!((l.value, l.base), (2, 2));
        assert!(l.reason().ends_with("raised to min_attempts 2"), "{l:?}");
        let best = Inputs {
            previous: 10,
            workers: 0.0,
            failure_rate: 0.0,
            attempts: 1000,
            utilization: 0.0,
            share_done: 0.0,
            job: None,
        };
        assert_eq!(limit(&best, &all).value, 10);
        // A previous value outside the bounds (say, from an older config) is clamped.
        assert_eq!(
            limit(
                &Inputs {
                    previous: 50,
                    ..neutral(0)
                },
                &all
            )
            .value,
            10
        );
        assert_eq!(limit(&neutral(0), &all).value, 2);
    }

    /// Claim 10: which inputs are used is configurable; an input not selected never moves it.
    #[test]
    fn config_selects_the_inputs() {
        // Every input at its extreme "lower the limit" value.
        let pressed = Inputs {
            previous: 10,
            workers: 100.0,
            failure_rate: 1.0,
            attempts: 1000,
            utilization: 1.0,
            share_done: 1.0,
            job: None,
        };
        for (adapt, want) in [
            (&[][..], 10),
            (&["workers"][..], 9),
            (&["failure_rate"][..], 9),
            (&["workers", "failure_rate"][..], 8),
            (&["stage"][..], 5),
            (&["utilization"][..], 5),
            (&["workers", "failure_rate", "stage", "utilization"][..], 2),
        ] {
            let l = limit(&pressed, &policy(adapt));
            assert_eq!(l.value, want, "adapt {adapt:?}: {}", l.reason());
        }
        // A fixed limit ignores everything, the job's stage included.
        let fixed = policy(&[]);
        let l = limit(
            &Inputs {
                job: Some(JobStage {
                    attempt: 3,
                    age_s: 999.0,
                }),
                ..pressed
            },
            &fixed,
        );
        assert_eq!(l.value, 10);
        assert_eq!(l.reason(), "fixed limit: max_attempts 10");
    }

    #[test]
    fn adapt_names_parse_and_print() {
        let a = Adapt::parse(&["utilization", "workers", "workers"]).unwrap();
        assert_eq!(a.names(), vec!["workers", "utilization"]);
        assert!(Adapt::parse::<&str>(&[]).unwrap().is_fixed());
        let e = Adapt::parse(&["load"]).unwrap_err();
        assert!(e.starts_with("unknown input \"load\"; use any of"), "{e}");
    }

    /// The tracker applies per-job stage with the job's own campaign share, on the tick's base.
    #[test]
    fn tracker_uses_tick_inputs_and_campaign_share() {
        let mut t = Tracker::new(policy(&["workers", "stage"]));
        assert_eq!(t.last.value, 10);
        let v = t
            .tick(Inputs {
                workers: 9.0,
                share_done: 0.0,
                ..neutral(10)
            })
            .value;
        assert_eq!(v, 9);
        t.shares.insert(7, 1.0);
        // Same base (9) as the tick: the per-job call does not step again.
        assert_eq!(t.for_job(1, 1, 0.0).value, 9);
        assert_eq!(t.for_job(7, 1, 0.0).value, 4); // 9 * 0.5
        assert_eq!(t.for_job(7, 1, 1000.0).value, 2); // 9 * 0.5 * 0.5 = 2.25
    }

    mod schedule {
        use super::super::*;
        use crate::config::RetryConfig;

        fn cfg(min: f64, max: f64) -> RetryConfig {
            RetryConfig {
                min_interval: Duration::from_secs_f64(min),
                max_interval: Duration::from_secs_f64(max),
                ..RetryConfig::default()
            }
        }

        #[test]
        fn delay_doubles_from_min_interval_up_to_max_interval() {
            let c = cfg(60.0, 3600.0);
            let secs: Vec<f64> = (1..=9)
                .map(|k| (delay(&c, k, 0.5).as_secs_f64() * 1000.0).round() / 1000.0)
                .collect();
            assert_eq!(
                secs,
                vec![
                    60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 3600.0, 3600.0, 3600.0
                ]
            );
            // Attempt 0 (never happens) and huge attempts stay finite and bounded.
            assert_eq!(delay(&c, 0, 0.5), Duration::from_secs(60));
            assert_eq!(delay(&c, u32::MAX, 0.5), Duration::from_secs(3600));
        }

        #[test]
        fn jitter_is_plus_minus_ten_percent() {
            let c = cfg(100.0, 100.0);
            assert_eq!(delay(&c, 1, 0.0), Duration::from_secs(90));
            assert_eq!(delay(&c, 1, 0.5), Duration::from_secs(100));
            let hi = delay(&c, 1, 0.999_999).as_secs_f64();
            assert!(hi < 110.0 && hi > 109.99, "{hi}");
            // Out-of-range draws are clamped, never outside [0.9, 1.1].
            assert_eq!(delay(&c, 1, -3.0), Duration::from_secs(90));
            assert_eq!(delay(&c, 1, 7.0), Duration::from_secs(110));
        }
    }

    /// Persistence: a restart keeps each job's attempt count, next attempt time, first attempt
    /// time, Message-ID and (through its campaign) envelope sender.
    mod spool {
        use crate::campaign::Row;
        use crate::campaign::tests::TempDir;
        use crate::spool::{Final, Record, Spool, Update};

        fn deferred(job_id: u64, attempt: u32, at: f64, next: f64) -> Record {
            Record {
                job_id,
                update: Update::Deferred {
                    next_attempt_at: next,
                },
                attempt,
                code: 451,
                enhanced: Some("4.3.0".into()),
                text: format!("Try again later (attempt {attempt})"),
                in_doubt: false,
                at,
            }
        }

        #[test]
        fn restart_keeps_attempts_next_time_and_message_id() {
            let d = TempDir::new("retry-persist");
            let db = d.0.join("spool.db");
            let fields = vec!["email".to_string()];
            let (job, msgid) = {
                let mut s = Spool::open(&db).unwrap();
                let c = s
                    .campaign("spring", "Subject: hi", "news@example.com", &fields)
                    .unwrap();
                let row = Row::Valid {
                    line: 2,
                    email: "a@x.org".into(),
                    values: vec!["a@x.org".into()],
                };
                s.ingest(c.id, &[row], 1, true).unwrap();
                let j = s.lease(1000.0, 10).unwrap().remove(0);
                assert_eq!(j.attempt, 1);
                s.record(&[deferred(j.job_id, 1, 1001.0, 1061.0)]).unwrap();
                let j2 = s.lease(1061.0, 10).unwrap().remove(0);
                assert_eq!((j2.attempt, j2.first_attempt_at), (2, Some(1001.0)));
                s.record(&[deferred(j2.job_id, 2, 1062.0, 1182.0)]).unwrap();
                (j.job_id, j.message_id)
            }; // the governor stops (or dies) here
            let mut s = Spool::open(&db).unwrap();
            assert_eq!(s.recover().unwrap(), 0);
            assert_eq!(s.next_due().unwrap(), Some(1182.0));
            assert!(s.lease(1181.0, 10).unwrap().is_empty(), "not due yet");
            let j = s.lease(1182.0, 10).unwrap().remove(0);
            assert_eq!(j.job_id, job);
            assert_eq!(j.attempt, 3, "attempt count survives the restart");
            assert_eq!(j.first_attempt_at, Some(1001.0), "age survives the restart");
            assert_eq!(j.message_id, msgid, "same Message-ID on every attempt");
            // The envelope sender is the campaign's, and the spool refuses to change it.
            let e = s
                .campaign("spring", "Subject: hi", "other@example.com", &fields)
                .unwrap_err();
            assert!(e.to_string().contains("different sender"), "{e}");
            // The last reply stays as the reason when the job ends expired.
            s.record(&[Record {
                update: Update::Final(Final::Expired),
                ..deferred(j.job_id, 3, 1183.0, 0.0)
            }])
            .unwrap();
            assert_eq!(s.job_state(job).unwrap().as_deref(), Some("expired"));
            let db = rusqlite::Connection::open(&db).unwrap();
            let (code, text): (i64, String) = db
                .query_row(
                    "SELECT last_code, last_text FROM jobs WHERE id = ?1",
                    [job as i64],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .unwrap();
            assert_eq!((code, text.as_str()), (451, "Try again later (attempt 3)"));
        }
    }
}
