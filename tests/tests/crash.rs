//! Crashes mid-campaign, with the real binaries (FAULTS F15; DESIGN "a crash loses no job").
//!
//! (a) SIGKILL of one worker: the governor restarts it, the run still exits 0, every job ends in a
//!     final state, the receiver (Postfix smtp-sink) got every recipient at least once, and the
//!     summary counts the restart.
//! (b) SIGKILL of the governor: no worker survives it (PDEATHSIG / socket EOF, checked within 2 s);
//!     the same command run again exits 0 with every job final and every recipient delivered at
//!     least once (receiver: `governor sink`'s ledger, which lists only accepted messages); the
//!     recipients delivered twice number at most the second run's `recovered`, and each of those
//!     is flagged in doubt in delivery.jsonl.

use std::collections::BTreeMap;
use std::time::Duration;

use integration::*;

fn per_recipient(stored: &[Stored]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for s in stored {
        for r in &s.rcpt {
            *m.entry(r.clone()).or_insert(0) += 1;
        }
    }
    m
}

fn all_recipients(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("r{i:05}@example.com")).collect()
}

/// A worker SIGKILLed mid-campaign is replaced (and counted as a restart), its jobs come back,
/// and the run still finishes with every job final.
#[test]
fn worker_killed_mid_campaign_is_replaced_and_every_job_finishes() {
    kill_a_worker(true);
}

fn kill_a_worker(check_restarts: bool) {
    const N: usize = 1500;
    let tmp = TestDir::new("crash-worker");
    let peer = Peer::smtp_sink(&tmp.join("received"), &[]);
    let camp = Campaign::new(&tmp.join("run"), peer.port)
        .rate(300.0)
        .workers(2, 4)
        .campaign("crash", numbered_recipients(N), SIMPLE_TEMPLATE);
    let cfg = camp.write();
    let run = spawn_governor(&cfg, None, &[]);

    assert!(
        wait_until(Duration::from_secs(60), || peer.count() >= 150
            || !alive(run.pid())),
        "no progress: receiver has {} messages\n{}",
        peer.count(),
        tail(&run.stderr_now(), 4000)
    );
    let mut workers = Vec::new();
    assert!(
        wait_until(Duration::from_secs(10), || {
            workers = run.workers();
            !workers.is_empty()
        }),
        "governor {} has no mta-worker children",
        run.pid()
    );
    let victim = workers[0];
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(victim), Sig::SIGKILL)
        .expect("kill -9 worker");
    let delivered_at_kill = peer.count();
    assert!(
        delivered_at_kill < N,
        "campaign finished before the kill; raise N"
    );
    // min_workers = 2: a replacement worker (a new pid) must appear.
    let replaced = wait_until(Duration::from_secs(15), || {
        run.workers().iter().any(|p| !workers.contains(p)) || !alive(run.pid())
    });
    assert!(
        replaced,
        "no replacement for the killed worker {victim} within 15 s"
    );

    let gov_pid = run.pid();
    let out = run.wait(Duration::from_secs(180));
    out.expect_code(0);
    let sum = out.summary();
    assert_eq!(sum["status"], "complete", "summary {sum}");
    assert!(
        !check_restarts || sum["restarts"].as_u64().unwrap_or(0) >= 1,
        "summary restarts {} after a worker was SIGKILLed",
        sum["restarts"]
    );
    assert_eq!(sum["pending"], 0, "summary {sum}");
    assert_eq!(sum["delivered"], N, "summary {sum}");
    assert!(!alive(victim), "killed worker {victim} still alive");
    assert!(
        children(gov_pid).is_empty(),
        "processes left behind by the governor"
    );

    let states = spool_states(&camp.spool());
    assert_eq!(
        spool_unfinished(&camp.spool()),
        0,
        "jobs without a final state: {states:?}"
    );
    assert_eq!(
        states.get("delivered").copied(),
        Some(N as u64),
        "spool states {states:?}"
    );

    let counts = per_recipient(&peer.messages());
    let missing: Vec<String> = all_recipients(N)
        .into_iter()
        .filter(|r| !counts.contains_key(r))
        .collect();
    assert!(
        missing.is_empty(),
        "{} recipients never reached the receiver, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
}

#[test]
fn governor_killed_mid_campaign_leaves_no_worker_and_rerun_completes_with_bounded_duplicates() {
    const N: usize = 3000;
    let tmp = TestDir::new("crash-governor");
    let peer = Peer::governor_sink(&tmp.join("received"), &[]);
    let camp = Campaign::new(&tmp.join("run"), peer.port)
        .rate(300.0)
        .workers(1, 4)
        .campaign("crash", numbered_recipients(N), SIMPLE_TEMPLATE);
    let cfg = camp.write();
    let mut run = spawn_governor(&cfg, None, &[]);

    assert!(
        wait_until(Duration::from_secs(60), || peer.count() >= 900
            || !alive(run.pid())),
        "no progress: receiver has {} messages\n{}",
        peer.count(),
        tail(&run.stderr_now(), 4000)
    );
    let workers = run.workers();
    assert!(
        !workers.is_empty(),
        "governor {} has no mta-worker children",
        run.pid()
    );
    run.signal(Sig::SIGKILL);
    assert!(
        run.proc.wait_timeout(Duration::from_secs(5)).is_some(),
        "governor survived SIGKILL"
    );
    let at_kill = peer.count();
    assert!(at_kill < N, "campaign finished before the kill; raise N");
    let survived = || {
        workers
            .iter()
            .copied()
            .filter(|&p| alive(p))
            .collect::<Vec<_>>()
    };
    let gone = wait_until(Duration::from_secs(2), || survived().is_empty());
    let left = survived();
    // Clean up before asserting, so a failure leaves nothing running.
    for p in &left {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(*p), Sig::SIGKILL);
    }
    assert!(
        gone,
        "workers {left:?} survived the governor's SIGKILL by more than 2 s"
    );
    drop(run);

    let out = run_governor(&cfg, &[], Duration::from_secs(180));
    out.expect_code(0);
    let sum = out.summary();
    assert_eq!(sum["status"], "complete", "summary {sum}");
    assert_eq!(sum["pending"], 0, "summary {sum}");
    let recovered = sum["recovered"].as_u64().expect("summary.recovered");

    let states = spool_states(&camp.spool());
    assert_eq!(
        spool_unfinished(&camp.spool()),
        0,
        "jobs without a final state: {states:?}"
    );
    assert_eq!(
        states.get("delivered").copied(),
        Some(N as u64),
        "spool states {states:?}"
    );

    let counts = per_recipient(&peer.messages());
    let missing: Vec<String> = all_recipients(N)
        .into_iter()
        .filter(|r| !counts.contains_key(r))
        .collect();
    assert!(
        missing.is_empty(),
        "{} recipients never delivered, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    let dups: Vec<(&String, &usize)> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        dups.iter().all(|(_, n)| **n == 2),
        "recipients delivered more than twice: {:?}",
        dups.iter().filter(|(_, n)| **n > 2).collect::<Vec<_>>()
    );
    assert!(
        dups.len() as u64 <= recovered,
        "{} recipients delivered twice but only {recovered} jobs recovered at restart: {:?}",
        dups.len(),
        &dups[..dups.len().min(10)]
    );
    let log = camp.delivery_log();
    let unflagged: Vec<&String> = dups
        .iter()
        .map(|(r, _)| *r)
        .filter(|r| {
            !log.iter()
                .any(|l| l["recipient"] == r.as_str() && l["in_doubt"] == true)
        })
        .collect();
    assert!(
        unflagged.is_empty(),
        "duplicates not flagged in_doubt in delivery.jsonl: {unflagged:?}"
    );
    eprintln!(
        "governor kill: {at_kill} delivered at the kill, {recovered} recovered, {} duplicates",
        dups.len()
    );
}
