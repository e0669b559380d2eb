//! What the sink answers after a final dot, and after how long.
//!
//! [`Policy::decide`] is the only place that decides, and it is a pure function of the message's
//! sequence number and the time since the sink started: a later latency/failure *profile* that
//! changes over time slots in here without touching the protocol or the server loop.

use std::time::Duration;

use super::SinkOptions;

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
    pub fn decide(&self, seq: u64, _elapsed: Duration) -> Decision {
        let roll = unit(self.seed, seq) * 100.0;
        let temp = self.options.tempfail_pct;
        let verdict = if roll < temp {
            Verdict::TempFail
        } else if roll < temp + self.options.permfail_pct {
            Verdict::PermFail
        } else {
            Verdict::Accept
        };
        Decision {
            delay: Duration::from_millis(self.options.latency_ms),
            verdict,
        }
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
            tempfail_pct,
            permfail_pct,
            dump: None,
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
}
