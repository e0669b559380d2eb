//! Operator signals on a running `governor run`, with the real binaries and Postfix smtp-sink.
//!
//! - SIGHUP with a new `target_rate` changes the delivered rate: measured from delivery.jsonl
//!   timestamps in a window before and after the reload, the rate after must be clearly higher
//!   (> 2x for a 4x target). A direction check, not a timing assertion.
//! - SIGHUP with a broken config (bad TOML, then min_workers > max_workers) is logged ("reload
//!   failed, keeping the running configuration"), the run goes on and ends with exit 0.
//! - SIGTERM stops with exit 3 (status "interrupted", jobs pending, no worker left), and the same
//!   command run again completes: every job final, every recipient delivered.

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use integration::*;

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// Delivered attempts per second in [from, to).
fn rate_between(times: &[f64], from: f64, to: f64) -> f64 {
    assert!(
        to - from >= 1.5,
        "window [{from}, {to}) too short to measure"
    );
    times.iter().filter(|&&t| t >= from && t < to).count() as f64 / (to - from)
}

#[test]
fn sighup_with_a_higher_target_rate_speeds_delivery_up() {
    const N: usize = 2000;
    const BEFORE_S: u64 = 10;
    let tmp = TestDir::new("sighup-rate");
    let peer = Peer::smtp_sink(&tmp.join("received"), &[]);
    let camp = Campaign::new(&tmp.join("run"), peer.port)
        .rate(50.0)
        .workers(1, 4)
        .campaign("hup", numbered_recipients(N), SIMPLE_TEMPLATE);
    let cfg = camp.write();
    let run = spawn_governor(&cfg, None, &[]);
    let log = camp.log_dir().join("delivery.jsonl");
    assert!(
        wait_until(Duration::from_secs(30), || count_lines(&log) > 0
            || !alive(run.pid())),
        "nothing delivered within 30 s\n{}",
        tail(&run.stderr_now(), 4000)
    );
    std::thread::sleep(Duration::from_secs(BEFORE_S));
    let faster = Campaign {
        target_rate: 200.0,
        ..camp.clone()
    };
    camp.rewrite_config(&faster.toml());
    let t_hup = unix_now();
    run.signal(Sig::SIGHUP);

    let out = run.wait(Duration::from_secs(120));
    out.expect_code(0);
    let sum = out.summary();
    assert_eq!(sum["delivered"], N, "summary {sum}");

    let mut times: Vec<f64> = camp
        .delivery_log()
        .iter()
        .filter(|l| l["outcome"] == "delivered")
        .filter_map(|l| l["time"].as_f64())
        .collect();
    times.sort_by(f64::total_cmp);
    let (first, last) = (times[0], *times.last().unwrap());
    // Skip the start-up and the second after the reload; stop before the queue runs dry.
    let before = rate_between(&times, first + 2.0, t_hup);
    let after_end = (t_hup + 8.0).min(last - 0.5);
    let after = rate_between(&times, t_hup + 2.0, after_end);
    eprintln!("delivered/s before SIGHUP {before:.1} (target 50), after {after:.1} (target 200)");
    assert!(before > 0.0, "no deliveries before the SIGHUP");
    assert!(
        after > 2.0 * before,
        "rate after SIGHUP {after:.1}/s is not clearly above the rate before {before:.1}/s (target 50 -> 200)"
    );
}

#[test]
fn sighup_with_a_broken_config_keeps_the_running_one() {
    const N: usize = 600;
    let tmp = TestDir::new("sighup-broken");
    let peer = Peer::smtp_sink(&tmp.join("received"), &[]);
    let camp = Campaign::new(&tmp.join("run"), peer.port)
        .rate(100.0)
        .workers(1, 2)
        .campaign("broken", numbered_recipients(N), SIMPLE_TEMPLATE);
    let cfg = camp.write();
    let run = spawn_governor(&cfg, None, &[]);
    assert!(
        wait_until(Duration::from_secs(30), || peer.count() >= 50
            || !alive(run.pid())),
        "no progress\n{}",
        tail(&run.stderr_now(), 4000)
    );
    let reload_failures = |r: &GovernorRun| r.stderr_now().matches("reload failed").count();
    let broken = [
        format!("{}\nthis is = = not toml\n", camp.toml()),
        Campaign {
            min_workers: 3,
            max_workers: 1,
            ..camp.clone()
        }
        .toml(),
    ];
    for (i, text) in broken.iter().enumerate() {
        camp.rewrite_config(text);
        run.signal(Sig::SIGHUP);
        assert!(
            wait_until(Duration::from_secs(10), || reload_failures(&run) > i
                || !alive(run.pid())),
            "broken config #{i}: no \"reload failed\" in the log\n{}",
            tail(&run.stderr_now(), 4000)
        );
        assert!(
            alive(run.pid()),
            "governor exited after SIGHUP with broken config #{i}"
        );
    }
    let out = run.wait(Duration::from_secs(120));
    out.expect_code(0);
    let sum = out.summary();
    assert_eq!(sum["status"], "complete", "summary {sum}");
    assert_eq!(sum["delivered"], N, "summary {sum}");
    let line = out
        .stderr
        .lines()
        .find(|l| l.contains("reload failed"))
        .unwrap();
    assert!(
        line.contains("keeping the running configuration"),
        "reload failure line: {line}"
    );
    assert_eq!(peer.count(), N);
}

#[test]
fn sigterm_stops_with_exit_3_and_a_rerun_completes() {
    const N: usize = 2000;
    let tmp = TestDir::new("sigterm");
    let peer = Peer::smtp_sink(&tmp.join("received"), &[]);
    let camp = Campaign::new(&tmp.join("run"), peer.port)
        .rate(200.0)
        .workers(1, 4)
        .campaign("term", numbered_recipients(N), SIMPLE_TEMPLATE);
    let cfg = camp.write();
    let run = spawn_governor(&cfg, None, &[]);
    assert!(
        wait_until(Duration::from_secs(30), || peer.count() >= 200
            || !alive(run.pid())),
        "no progress\n{}",
        tail(&run.stderr_now(), 4000)
    );
    let workers = run.workers();
    let gov = run.pid();
    let t = Instant::now();
    run.signal(Sig::SIGTERM);
    let out = run.wait(Duration::from_secs(60));
    eprintln!("stopped {:.1}s after SIGTERM", t.elapsed().as_secs_f64());
    out.expect_code(3);
    let sum = out.summary();
    assert_eq!(sum["status"], "interrupted", "summary {sum}");
    assert!(
        sum["pending"].as_u64().unwrap() > 0,
        "nothing pending after an early SIGTERM: {sum}"
    );
    assert!(
        workers.iter().all(|&p| !alive(p)),
        "workers {workers:?} outlived the governor {gov}"
    );
    assert!(
        spool_unfinished(&camp.spool()) > 0,
        "spool {:?}",
        spool_states(&camp.spool())
    );

    let out2 = run_governor(&cfg, &[], Duration::from_secs(120));
    out2.expect_code(0);
    let sum2 = out2.summary();
    assert_eq!(sum2["status"], "complete", "summary {sum2}");
    assert_eq!(sum2["delivered"], N, "summary {sum2}");
    assert_eq!(
        spool_unfinished(&camp.spool()),
        0,
        "spool {:?}",
        spool_states(&camp.spool())
    );
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for s in peer.messages() {
        for r in s.rcpt {
            *counts.entry(r).or_default() += 1;
        }
    }
    let missing = (0..N)
        .filter(|i| !counts.contains_key(&format!("r{i:05}@example.com")))
        .count();
    assert_eq!(missing, 0, "recipients never delivered");
    let dups = counts.values().filter(|&&n| n > 1).count() as u64;
    let recovered = sum2["recovered"].as_u64().unwrap();
    assert!(
        dups <= recovered,
        "{dups} recipients delivered twice after a graceful stop, {recovered} recovered"
    );
}
