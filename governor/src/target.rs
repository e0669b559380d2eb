//! The target rate over time: a constant, a schedule of steps and linear ramps (IP warm-up), or
//! a deadline from which the rate is derived.
//!
//! # Theory of operation
//! [`Target::rate`] is a pure function of the wall-clock time, the time the run started and the
//! number of jobs without a final state; the control loop calls it at every decision, so a
//! schedule point, a deadline coming closer or a SIGHUP that replaced the whole target all take
//! effect at the next tick. Times are either offsets in seconds from the start of the run (for
//! tests, benchmarks and "in two hours") or absolute instants (a TOML datetime with an offset,
//! kept as Unix seconds) that survive a restart: a warm-up over seven days must not start again
//! because the governor was restarted on day three.
//!
//! - **Constant**: `target_rate`.
//! - **Schedule**: points `(at, rate, ramp)` in time order. Before the first point the rate is
//!   `target_rate`; at a point without `ramp` the rate steps to the point's rate; towards a point
//!   with `ramp = true` it rises (or falls) linearly from the previous point's rate, so "10/s
//!   rising to 500/s over 7 days" is `{ at = 0, rate = 10 }, { at = 604800, rate = 500, ramp =
//!   true }`. After the last point its rate holds.
//! - **Deadline**: rate = remaining jobs / remaining time, re-derived every tick, never below
//!   `floor` (so a campaign whose deadline is far away still moves) nor above `ceiling`
//!   (`target_rate` unless set). At or past the deadline the rate is `ceiling`: late, so as fast
//!   as allowed.

use serde::Serialize;

/// A point in time: seconds after the run started, or an absolute Unix time.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum When {
    /// Seconds after the start of the run.
    Offset(f64),
    /// Seconds since the Unix epoch.
    Unix(f64),
}

impl When {
    /// Unix seconds, given when the run started.
    pub fn unix(self, start_unix: f64) -> f64 {
        match self {
            When::Offset(s) => start_unix + s,
            When::Unix(t) => t,
        }
    }
}

/// One schedule point.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Point {
    /// When the point's rate is reached.
    pub at: When,
    /// Messages/s at that time.
    pub rate: f64,
    /// Rise (or fall) linearly from the previous point instead of stepping at `at`.
    pub ramp: bool,
}

/// A deadline: deliver everything by `at`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Deadline {
    /// When every job should have a final state.
    pub at: When,
    /// Lowest rate, messages/s.
    pub floor: f64,
    /// Highest rate, messages/s.
    pub ceiling: f64,
}

/// How the target rate is set.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// A fixed rate.
    Constant(f64),
    /// `target_rate` before the first point, then the points.
    Schedule {
        /// The rate before the first point.
        initial: f64,
        /// Points in time order.
        points: Vec<Point>,
    },
    /// Derived from the jobs left and the time left.
    Deadline(Deadline),
}

impl Target {
    /// The target rate at `now_unix` for a run that started at `start_unix` with `remaining`
    /// jobs without a final state, and a short description for the control log.
    pub fn rate(&self, now_unix: f64, start_unix: f64, remaining: u64) -> (f64, String) {
        match self {
            Target::Constant(r) => (*r, "constant".to_string()),
            Target::Schedule { initial, points } => {
                let mut prev = (start_unix, *initial);
                for p in points {
                    let at = p.at.unix(start_unix);
                    if now_unix < at {
                        if p.ramp && at > prev.0 {
                            let f = ((now_unix - prev.0) / (at - prev.0)).clamp(0.0, 1.0);
                            let r = prev.1 + (p.rate - prev.1) * f;
                            return (
                                r,
                                format!(
                                    "ramp {:.1} -> {:.1}/s, {:.0}% of the way",
                                    prev.1,
                                    p.rate,
                                    f * 100.0
                                ),
                            );
                        }
                        return (prev.1, format!("step at {:.1}/s", prev.1));
                    }
                    // A ramp starts at the previous point's time, or at the run's start if that
                    // is later (a ramp whose start is before the run resumes part-way).
                    prev = (at, p.rate);
                }
                (prev.1, format!("schedule done, {:.1}/s", prev.1))
            }
            Target::Deadline(d) => {
                let left = d.at.unix(start_unix) - now_unix;
                if left <= 0.0 {
                    return (
                        d.ceiling,
                        format!("deadline passed, {remaining} left: ceiling"),
                    );
                }
                let r = (remaining as f64 / left).clamp(d.floor, d.ceiling.max(d.floor));
                (r, format!("{remaining} jobs in {left:.0}s"))
            }
        }
    }

    /// Checks the schedule is in time order (given the start, for absolute points).
    pub fn check(&self, start_unix: f64) -> Result<(), String> {
        if let Target::Schedule { points, .. } = self {
            for (i, w) in points.windows(2).enumerate() {
                if w[1].at.unix(start_unix) < w[0].at.unix(start_unix) {
                    return Err(format!(
                        "schedule[{}] is earlier than schedule[{i}]: points must be in time order",
                        i + 1
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Unix seconds of a civil UTC date and time (proleptic Gregorian; Howard Hinnant's algorithm).
pub fn unix_from_civil(y: i64, m: u32, d: u32, hh: u32, mm: u32, ss: f64) -> f64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (i64::from(m) + 9) % 12;
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    days as f64 * 86400.0 + f64::from(hh) * 3600.0 + f64::from(mm) * 60.0 + ss
}

#[cfg(test)]
mod tests {
    use super::*;

    const START: f64 = 1_700_000_000.0;
    const DAY: f64 = 86400.0;

    fn at(s: f64) -> When {
        When::Offset(s)
    }

    #[test]
    fn constant_is_constant() {
        let t = Target::Constant(250.0);
        for now in [START, START + 1e6] {
            assert_eq!(t.rate(now, START, 10).0, 250.0);
        }
    }

    #[test]
    fn ip_warm_up_ramp_over_seven_days() {
        // "10/s, rising to 500/s over 7 days"
        let t = Target::Schedule {
            initial: 10.0,
            points: vec![
                Point {
                    at: at(0.0),
                    rate: 10.0,
                    ramp: false,
                },
                Point {
                    at: at(7.0 * DAY),
                    rate: 500.0,
                    ramp: true,
                },
            ],
        };
        let table = [
            (0.0, 10.0),
            (3.5 * DAY, 255.0),
            (7.0 * DAY, 500.0),
            (1.0 * DAY, 10.0 + 490.0 / 7.0),
            (30.0 * DAY, 500.0),
        ];
        for (dt, want) in table {
            let (r, why) = t.rate(START + dt, START, 0);
            assert!((r - want).abs() < 1e-6, "at {dt}: {r} ({why})");
        }
        assert!(t.rate(START + 3.5 * DAY, START, 0).1.contains("50%"));
    }

    #[test]
    fn steps_and_ramps_mixed() {
        // 100/s, step to 200 at 20 s, ramp down to 50 by 60 s, step to 400 at 100 s
        let t = Target::Schedule {
            initial: 100.0,
            points: vec![
                Point {
                    at: at(20.0),
                    rate: 200.0,
                    ramp: false,
                },
                Point {
                    at: at(60.0),
                    rate: 50.0,
                    ramp: true,
                },
                Point {
                    at: at(100.0),
                    rate: 400.0,
                    ramp: false,
                },
            ],
        };
        let table = [
            (0.0, 100.0),
            (19.99, 100.0),
            (20.0, 200.0),
            (40.0, 125.0),
            (60.0, 50.0),
            (99.0, 50.0),
            (100.0, 400.0),
            (1000.0, 400.0),
        ];
        for (dt, want) in table {
            let (r, why) = t.rate(START + dt, START, 0);
            assert!((r - want).abs() < 1e-6, "at {dt}: {r} ({why})");
        }
    }

    #[test]
    fn absolute_points_survive_a_restart() {
        // A ramp over [T, T+100] in absolute time; a run that started at T+50 is half-way.
        let t0 = START;
        let t = Target::Schedule {
            initial: 0.0,
            points: vec![
                Point {
                    at: When::Unix(t0),
                    rate: 0.0,
                    ramp: false,
                },
                Point {
                    at: When::Unix(t0 + 100.0),
                    rate: 100.0,
                    ramp: true,
                },
            ],
        };
        assert!((t.rate(t0 + 50.0, t0 + 50.0, 0).0 - 50.0).abs() < 1e-9);
    }

    #[test]
    fn deadline_derives_the_rate_from_what_is_left() {
        let t = Target::Deadline(Deadline {
            at: at(3600.0),
            floor: 1.0,
            ceiling: 500.0,
        });
        let table = [
            // (now offset, remaining, expected rate)
            (0.0, 36_000, 10.0),
            (1800.0, 36_000, 20.0),     // behind: faster
            (1800.0, 9_000, 5.0),       // ahead: slower
            (3590.0, 1_000_000, 500.0), // capped at the ceiling
            (0.0, 10, 1.0),             // the floor keeps it moving
            (3600.0, 100, 500.0),       // at the deadline: ceiling
            (7200.0, 100, 500.0),       // past it: ceiling
        ];
        for (dt, left, want) in table {
            let (r, why) = t.rate(START + dt, START, left);
            assert!((r - want).abs() < 1e-9, "at {dt} with {left}: {r} ({why})");
        }
    }

    #[test]
    fn schedule_order_is_checked() {
        let t = Target::Schedule {
            initial: 1.0,
            points: vec![
                Point {
                    at: at(10.0),
                    rate: 1.0,
                    ramp: false,
                },
                Point {
                    at: at(5.0),
                    rate: 1.0,
                    ramp: false,
                },
            ],
        };
        assert!(t.check(START).unwrap_err().contains("schedule[1]"));
    }

    #[test]
    fn civil_time_to_unix() {
        assert_eq!(unix_from_civil(1970, 1, 1, 0, 0, 0.0), 0.0);
        assert_eq!(unix_from_civil(2000, 3, 1, 0, 0, 0.0), 951_868_800.0);
        assert_eq!(unix_from_civil(2024, 2, 29, 18, 0, 0.0), 1_709_229_600.0);
    }
}
