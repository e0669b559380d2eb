//! What the sink answers after a final dot, and after how long.
//!
//! [`Policy::decide`] is the only place that decides, and it is a pure function of the message's
//! sequence number and the time since the sink started. A [`Profile`] changes the latency and
//! the failure shares over time (a receiver that slows down, pushes back with 4xx, or refuses
//! connections for a while), so a benchmark can drive the governor's control loop through the
//! situations it must handle.
//!
//! Latency is log-normal when `sigma > 0`: `latency_ms` is its median and each message's delay is
//! `latency_ms * exp(sigma * z)` with z standard normal, drawn from the message's sequence
//! number (Box-Muller over two splitmix64 draws), so runs are reproducible.

use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use super::SinkOptions;

/// One period of a [`Profile`]: from `from` to `until` seconds after the sink started, the keys
/// it sets replace the sink's options. Later phases win where phases overlap.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Phase {
    /// Start, seconds after the sink started (default 0).
    #[serde(default)]
    pub from: f64,
    /// End, seconds after the sink started (default: never).
    pub until: Option<f64>,
    /// Median delay before the reply to the final dot, ms.
    pub latency_ms: Option<f64>,
    /// Log-normal sigma of that delay (0: fixed).
    pub sigma: Option<f64>,
    /// Percent of messages answered 451 after the dot.
    pub tempfail_pct: Option<f64>,
    /// Percent of messages answered 550 after the dot.
    pub permfail_pct: Option<f64>,
    /// Refuse new connections (they are closed before the greeting).
    pub refuse: Option<bool>,
}

/// A latency/failure profile over time, read from a TOML file:
///
/// ```toml
/// # the base, instead of the command line's values (all optional)
/// latency_ms = 5
/// sigma = 0.5
/// # 50 ms from t=30 s, back to the base at t=60 s
/// [[phase]]
/// from = 30
/// until = 60
/// latency_ms = 50
/// # 20% 4xx between t=40 s and t=50 s
/// [[phase]]
/// from = 40
/// until = 50
/// tempfail_pct = 20
/// # no new connections between 70 s and 75 s
/// [[phase]]
/// from = 70
/// until = 75
/// refuse = true
/// ```
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// Base median latency, ms.
    pub latency_ms: Option<f64>,
    /// Base log-normal sigma.
    pub sigma: Option<f64>,
    /// Base percent of 451 replies.
    pub tempfail_pct: Option<f64>,
    /// Base percent of 550 replies.
    pub permfail_pct: Option<f64>,
    /// The phases, in any order; later ones win where they overlap.
    #[serde(default, rename = "phase")]
    pub phases: Vec<Phase>,
}

/// The receiver's behaviour at one moment.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Settings {
    /// Median latency, ms.
    pub latency_ms: f64,
    /// Log-normal sigma.
    pub sigma: f64,
    /// Percent of 451 replies.
    pub tempfail_pct: f64,
    /// Percent of 550 replies.
    pub permfail_pct: f64,
    /// New connections are refused.
    pub refuse: bool,
}

impl Profile {
    /// Parses a profile; errors name the file and what is wrong.
    pub fn parse(name: &str, text: &str) -> anyhow::Result<Profile> {
        let p: Profile =
            toml::from_str(text).map_err(|e| anyhow::anyhow!("{name}: {}", e.message()))?;
        let pct = |k: &str, v: Option<f64>| -> anyhow::Result<()> {
            if let Some(v) = v {
                anyhow::ensure!(
                    (0.0..=100.0).contains(&v),
                    "{name}: {k} must be a percentage between 0 and 100 (got {v})"
                );
            }
            Ok(())
        };
        let nonneg = |k: &str, v: Option<f64>| -> anyhow::Result<()> {
            if let Some(v) = v {
                anyhow::ensure!(
                    v.is_finite() && v >= 0.0,
                    "{name}: {k} must be a number >= 0 (got {v})"
                );
            }
            Ok(())
        };
        pct("tempfail_pct", p.tempfail_pct)?;
        pct("permfail_pct", p.permfail_pct)?;
        nonneg("latency_ms", p.latency_ms)?;
        nonneg("sigma", p.sigma)?;
        for (i, ph) in p.phases.iter().enumerate() {
            let k = |x: &str| format!("phase[{i}].{x}");
            pct(&k("tempfail_pct"), ph.tempfail_pct)?;
            pct(&k("permfail_pct"), ph.permfail_pct)?;
            nonneg(&k("latency_ms"), ph.latency_ms)?;
            nonneg(&k("sigma"), ph.sigma)?;
            nonneg(&k("from"), Some(ph.from))?;
            if let Some(u) = ph.until {
                anyhow::ensure!(
                    u >= ph.from,
                    "{name}: phase[{i}].until ({u}) must not be before phase[{i}].from ({})",
                    ph.from
                );
            }
        }
        Ok(p)
    }

    /// Reads a profile file.
    pub fn load(path: &Path) -> anyhow::Result<Profile> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("{}: cannot read: {e}", path.display()))?;
        Profile::parse(&path.display().to_string(), &text)
    }

    /// The settings `t` seconds after the start, over the base `base`.
    pub fn at(&self, base: Settings, t: f64) -> Settings {
        let mut s = Settings {
            latency_ms: self.latency_ms.unwrap_or(base.latency_ms),
            sigma: self.sigma.unwrap_or(base.sigma),
            tempfail_pct: self.tempfail_pct.unwrap_or(base.tempfail_pct),
            permfail_pct: self.permfail_pct.unwrap_or(base.permfail_pct),
            refuse: base.refuse,
        };
        for ph in &self.phases {
            if t >= ph.from && ph.until.is_none_or(|u| t < u) {
                s.latency_ms = ph.latency_ms.unwrap_or(s.latency_ms);
                s.sigma = ph.sigma.unwrap_or(s.sigma);
                s.tempfail_pct = ph.tempfail_pct.unwrap_or(s.tempfail_pct);
                s.permfail_pct = ph.permfail_pct.unwrap_or(s.permfail_pct);
                s.refuse = ph.refuse.unwrap_or(s.refuse);
            }
        }
        s
    }
}

/// The seed used by [`super::start`]; fixed so that two runs with the same options fail the same
/// messages, which makes a demo or a failure profile reproducible.
pub const DEFAULT_SEED: u64 = 0x676f_7665_726e_6f72; // "governor"

/// How a message is answered after its final dot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// `250 2.0.0`: accepted (and dumped, if dumping).
    Accept,
    /// `451 4.3.0`: the sender should retry later.
    TempFail,
    /// `550 5.1.1`: the sender should bounce.
    PermFail,
}

/// The answer to one message: wait `delay`, then reply according to `verdict`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    /// Simulated receiver work before the reply to the final dot.
    pub delay: Duration,
    /// Which reply to give.
    pub verdict: Verdict,
}

/// Decides every message's [`Decision`] from the sink's options.
#[derive(Clone, Debug)]
pub struct Policy {
    options: SinkOptions,
    seed: u64,
}

impl Policy {
    /// A policy for `options`, with failures drawn from a pseudo-random sequence fixed by `seed`.
    pub fn new(options: SinkOptions, seed: u64) -> Self {
        Policy { options, seed }
    }

    /// The decision for message number `seq` (1-based, sink-wide), `elapsed` after the sink started.
    /// One uniform draw per message is split into tempfail, permfail and accept bands, so
    /// `tempfail_pct = 10` fails 10% of messages (not 10% of the ones not permfailed).
    pub fn decide(&self, seq: u64, elapsed: Duration) -> Decision {
        let s = self.settings(elapsed);
        let roll = unit(self.seed, seq) * 100.0;
        let temp = s.tempfail_pct;
        let verdict = if roll < temp {
            Verdict::TempFail
        } else if roll < temp + s.permfail_pct {
            Verdict::PermFail
        } else {
            Verdict::Accept
        };
        let mut ms = s.latency_ms;
        if s.sigma > 0.0 && ms > 0.0 {
            // Box-Muller with two more independent draws for this message.
            let u1 = unit(self.seed ^ 0x5851_f42d_4c95_7f2d, seq).max(1e-12);
            let u2 = unit(self.seed ^ 0x1405_7b7e_f767_814f, seq);
            let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
            // capped at 50 sigma-free medians so one draw cannot stall a session for minutes
            ms = (ms * (s.sigma * z).exp()).min(ms * 50.0);
        }
        Decision {
            delay: Duration::from_secs_f64(ms / 1000.0),
            verdict,
        }
    }

    /// The receiver's settings `elapsed` after the start (options plus profile).
    pub fn settings(&self, elapsed: Duration) -> Settings {
        let o = &self.options;
        let base = Settings {
            latency_ms: o.latency_ms as f64,
            sigma: o.latency_sigma,
            tempfail_pct: o.tempfail_pct,
            permfail_pct: o.permfail_pct,
            refuse: false,
        };
        o.profile.at(base, elapsed.as_secs_f64())
    }

    /// Whether a new connection `elapsed` after the start is refused.
    pub fn refuse(&self, elapsed: Duration) -> bool {
        self.settings(elapsed).refuse
    }
}

/// A uniform value in [0, 1) for `seq`: splitmix64 (Steele, Lea, Flood 2014), a strong mixer
/// that is cheap and needs no state shared between sessions.
fn unit(seed: u64, seq: u64) -> f64 {
    let mut z = seed.wrapping_add(seq.wrapping_mul(0x9e37_79b9_7f4a_7c15));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    (z >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(latency_ms: u64, tempfail_pct: f64, permfail_pct: f64) -> Policy {
        let options = SinkOptions {
            listen: "127.0.0.1:0".parse().unwrap(),
            latency_ms,
            latency_sigma: 0.0,
            tempfail_pct,
            permfail_pct,
            dump: None,
            profile: Profile::default(),
        };
        Policy::new(options, DEFAULT_SEED)
    }

    fn shares(p: &Policy, n: u64) -> (f64, f64, f64) {
        let (mut a, mut t, mut f) = (0u64, 0u64, 0u64);
        for seq in 1..=n {
            match p.decide(seq, Duration::ZERO).verdict {
                Verdict::Accept => a += 1,
                Verdict::TempFail => t += 1,
                Verdict::PermFail => f += 1,
            }
        }
        let pct = |x: u64| x as f64 * 100.0 / n as f64;
        (pct(a), pct(t), pct(f))
    }

    #[test]
    fn failure_shares_follow_the_options() {
        // (tempfail %, permfail %) -> expected (accept, tempfail, permfail) within 0.5 points
        let table = [
            (0.0, 0.0, (100.0, 0.0, 0.0)),
            (100.0, 0.0, (0.0, 100.0, 0.0)),
            (0.0, 100.0, (0.0, 0.0, 100.0)),
            (10.0, 0.0, (90.0, 10.0, 0.0)),
            (10.0, 5.0, (85.0, 10.0, 5.0)),
            (50.0, 50.0, (0.0, 50.0, 50.0)),
            (0.5, 0.0, (99.5, 0.5, 0.0)),
        ];
        for (temp, perm, (a, t, f)) in table {
            let (ga, gt, gf) = shares(&policy(0, temp, perm), 100_000);
            let close = |x: f64, y: f64| (x - y).abs() < 0.5;
            assert!(
                close(ga, a) && close(gt, t) && close(gf, f),
                "{temp}/{perm}: got {ga}/{gt}/{gf}"
            );
        }
    }

    #[test]
    fn small_samples_are_close_too() {
        // The demo sends hundreds, not millions: 10% of 1000 should be near 100.
        let (_, t, _) = shares(&policy(0, 10.0, 0.0), 1000);
        assert!((7.0..13.0).contains(&t), "{t}");
    }

    #[test]
    fn decisions_are_reproducible_and_seeded() {
        let a = policy(5, 30.0, 30.0);
        let b = policy(5, 30.0, 30.0);
        let c = Policy::new(a.options.clone(), DEFAULT_SEED + 1);
        let run = |p: &Policy| {
            (1..=200)
                .map(|s| p.decide(s, Duration::ZERO))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(&a), run(&b));
        assert_ne!(run(&a), run(&c));
        assert!(run(&a).iter().all(|d| d.delay == Duration::from_millis(5)));
    }

    #[test]
    fn profile_changes_latency_and_failures_over_time() {
        let text = "latency_ms = 5\n\
            [[phase]]\nfrom = 30\nuntil = 60\nlatency_ms = 50\n\
            [[phase]]\nfrom = 40\nuntil = 50\ntempfail_pct = 20\n\
            [[phase]]\nfrom = 70\nuntil = 75\nrefuse = true\n";
        let mut p = policy(1, 0.0, 0.0);
        p.options.profile = Profile::parse("t", text).unwrap();
        let at = |s: f64| p.settings(Duration::from_secs_f64(s));
        // (time, latency, tempfail, refuse)
        let table = [
            (0.0, 5.0, 0.0, false),
            (29.9, 5.0, 0.0, false),
            (30.0, 50.0, 0.0, false),
            (45.0, 50.0, 20.0, false),
            (50.0, 50.0, 0.0, false),
            (60.0, 5.0, 0.0, false),
            (72.0, 5.0, 0.0, true),
            (75.0, 5.0, 0.0, false),
        ];
        for (t, lat, temp, refuse) in table {
            let s = at(t);
            assert_eq!(
                (s.latency_ms, s.tempfail_pct, s.refuse),
                (lat, temp, refuse),
                "at {t}"
            );
        }
        // decide follows: 20% 4xx during the surge, none outside
        let share = |t: f64| {
            (1..=5000)
                .filter(|&q| p.decide(q, Duration::from_secs_f64(t)).verdict == Verdict::TempFail)
                .count() as f64
                / 50.0
        };
        assert!((share(45.0) - 20.0).abs() < 2.0, "{}", share(45.0));
        assert_eq!(share(55.0), 0.0);
        assert_eq!(
            p.decide(1, Duration::from_secs(35)).delay,
            Duration::from_millis(50)
        );
    }

    #[test]
    fn log_normal_latency_has_the_median_and_spread_asked_for() {
        let mut p = policy(20, 0.0, 0.0);
        p.options.latency_sigma = 0.5;
        let mut d: Vec<f64> = (1..=20_000)
            .map(|q| p.decide(q, Duration::ZERO).delay.as_secs_f64() * 1000.0)
            .collect();
        d.sort_by(f64::total_cmp);
        let median = d[d.len() / 2];
        assert!((median - 20.0).abs() < 1.0, "{median}");
        // ln-space standard deviation ~ sigma
        let logs: Vec<f64> = d.iter().map(|x| x.ln()).collect();
        let mean = logs.iter().sum::<f64>() / logs.len() as f64;
        let sd = (logs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / logs.len() as f64).sqrt();
        assert!((sd - 0.5).abs() < 0.03, "{sd}");
    }

    #[test]
    fn bad_profiles_are_refused_with_the_key() {
        let e = Profile::parse("p.toml", "[[phase]]\ntempfail_pct = 120\n").unwrap_err();
        assert!(e.to_string().contains("phase[0].tempfail_pct"), "{e}");
        let e = Profile::parse("p.toml", "[[phase]]\nfrom = 10\nuntil = 5\n").unwrap_err();
        assert!(e.to_string().contains("phase[0].until"), "{e}");
        let e = Profile::parse("p.toml", "latncy_ms = 5\n").unwrap_err();
        assert!(e.to_string().contains("p.toml"), "{e}");
    }
}
