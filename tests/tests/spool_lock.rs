//! Two governors must never send the same queue (issue 5: users of campaign senders report "two
//! processes sending the same queue"). The first one holds an exclusive lock on `<spool>.lock`
//! for its whole run; a second one on the same spool is refused at start-up with exit 2 and a
//! message naming the spool and the other governor's pid, and it sends nothing. The lock is a
//! kernel flock, so the first governor's crash never leaves a stale lock behind.

use std::collections::BTreeMap;
use std::time::Duration;

use integration::*;

const N: usize = 400;

#[test]
fn a_second_governor_on_the_same_spool_is_refused_and_sends_nothing() {
    let tmp = TestDir::new("spool-lock");
    let peer = Peer::governor_sink(&tmp.join("received"), &[]);
    let camp = Campaign::new(&tmp.join("camp"), peer.port)
        .rate(100.0)
        .workers(1, 2)
        .campaign("locked", numbered_recipients(N), SIMPLE_TEMPLATE);
    let cfg = camp.write();

    let first = spawn_governor(&cfg, None, &[]);
    assert!(
        wait_until(Duration::from_secs(30), || !first.workers().is_empty()),
        "the first governor never started a worker"
    );
    let second = spawn_governor(&cfg, None, &[]).wait(Duration::from_secs(30));
    assert_eq!(second.code, Some(2), "stderr: {}", second.stderr);
    let lines: Vec<&str> = second
        .stderr
        .lines()
        .filter(|l| l.starts_with("governor: "))
        .collect();
    assert_eq!(lines.len(), 1, "one error line: {}", second.stderr);
    assert!(
        lines[0].contains("in use by another governor"),
        "{}",
        lines[0]
    );
    assert!(
        lines[0].contains(&format!("pid {}", first.pid())),
        "{}",
        lines[0]
    );

    // SIGKILL the first one: the kernel drops its lock, and the same command then resumes.
    first.signal(Sig::SIGKILL);
    let _ = first.wait(Duration::from_secs(10));
    let rerun = spawn_governor(&cfg, None, &[]).wait(Duration::from_secs(120));
    assert_eq!(rerun.code, Some(0), "stderr: {}", rerun.stderr);

    // Every recipient reached the receiver, and only the first governor's in-flight jobs can
    // have been sent twice (the refused one sent nothing).
    let mut per: BTreeMap<String, usize> = BTreeMap::new();
    for m in peer.messages() {
        for r in m.rcpt {
            *per.entry(r).or_insert(0) += 1;
        }
    }
    assert_eq!(per.len(), N);
    let dups: usize = per.values().map(|&n| n - 1).sum();
    let recovered = rerun.summary()["recovered"].as_u64().unwrap_or(0) as usize;
    assert!(
        dups <= recovered,
        "{dups} duplicates but only {recovered} recovered"
    );
}
