//! Chaos (issue 5): crashes and a vanishing receiver mid-campaign lose nothing.
//!
//! - `scripts/chaos` at a small scale (3,000 jobs, a worker SIGKILLed every 200 ms, the governor
//!   SIGKILLed twice and restarted with the same command): no job lost, duplicates within the
//!   jobs in flight at the kills and each flagged in doubt, spool integrity ok. The script does
//!   the killing and the counting; this test runs it on the binaries under test and checks the
//!   figures it writes.
//! - The receiver goes away for 10 s (its process stopped: connection refused) and comes back on
//!   the same port: the jobs tried meanwhile are deferred, then delivered; none bounces or
//!   expires, and every recipient reaches a receiver.

use std::collections::BTreeSet;
use std::fs;
use std::process::{Command, Stdio};
use std::time::Duration;

use integration::*;
use serde_json::Value;

#[test]
fn chaos_small_no_job_lost_and_duplicates_bounded_and_flagged() {
    let tmp = TestDir::new("chaos");
    let b = bins();
    let json = tmp.join("chaos.json");
    let out = Command::new(python())
        .arg(workspace_root().join("scripts/chaos"))
        .args(["--jobs", "3000", "--rate", "800", "--governor-kills", "2"])
        .args(["--max-workers", "4", "--no-build", "--seed", "7"])
        .arg("--governor")
        .arg(&b.governor)
        .arg("--worker")
        .arg(&b.worker)
        .arg("--dir")
        .arg(tmp.join("work"))
        .arg("--json")
        .arg(&json)
        .arg("--timeout")
        .arg("300")
        .stdin(Stdio::null())
        .output()
        .expect("run scripts/chaos");
    let stdout = String::from_utf8_lossy(&out.stdout);
    eprintln!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    let f: Value = serde_json::from_str(&fs::read_to_string(&json).expect("chaos.json"))
        .expect("chaos.json parses");
    assert_eq!(f["final_exit_code"], 0, "{f:#}");
    assert_eq!(f["lost"], 0, "jobs lost: {f:#}");
    assert!(
        f["duplicates"].as_u64() <= f["duplicate_bound"].as_u64(),
        "more duplicates than jobs in flight at the kills: {f:#}"
    );
    assert_eq!(f["duplicates_not_flagged_in_doubt"], 0, "{f:#}");
    assert_eq!(f["integrity_check"], "ok", "{f:#}");
    assert_eq!(f["panics"], 0, "{f:#}");
    assert_eq!(f["governor_kills"], 2, "{f:#}");
    assert!(f["worker_kills"].as_u64().unwrap_or(0) >= 1, "{f:#}");
    assert_eq!(f["spool_states"]["delivered"], 3000, "{f:#}");
    assert!(out.status.success(), "scripts/chaos failed:\n{stdout}");
}

/// `governor sink --listen 127.0.0.1:<port> --dump <dir>`, up and accepting.
fn sink_on(port: u16, dir: &std::path::Path) -> Proc {
    let log = fs::File::create(dir.with_extension("log")).unwrap();
    let mut c = Command::new(&bins().governor);
    c.args(["sink", "--listen", &format!("127.0.0.1:{port}"), "--dump"])
        .arg(dir)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    let mut p = Proc::spawn("sink", &mut c);
    assert!(
        wait_until(Duration::from_secs(20), || p.try_wait().is_some()
            || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()),
        "sink did not come up on port {port}"
    );
    assert!(p.try_wait().is_none(), "sink exited");
    p
}

fn ledger_rcpts(dir: &std::path::Path) -> Vec<String> {
    read_jsonl(&dir.join("ledger.jsonl"))
        .iter()
        .flat_map(|l| {
            l["rcpt"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .map(|v| {
                    v.as_str()
                        .unwrap_or("")
                        .trim_matches(['<', '>'])
                        .to_string()
                })
        })
        .collect()
}

#[test]
fn receiver_away_for_10s_defers_then_delivers_and_bounces_nothing() {
    const N: usize = 1500;
    let tmp = TestDir::new("chaos-outage");
    let port = free_port();
    let first = tmp.join("received-1");
    let second = tmp.join("received-2");
    let mut sink = sink_on(port, &first);
    let mut camp = Campaign::new(&tmp.join("run"), port)
        .rate(300.0)
        .workers(1, 4)
        .campaign("outage", numbered_recipients(N), SIMPLE_TEMPLATE);
    camp.max_attempts = 30;
    camp.retry_min_interval = 1.0;
    camp.retry_max_interval = 2.0;
    let cfg = camp.write();
    let run = spawn_governor(&cfg, None, &[]);
    assert!(
        wait_until(Duration::from_secs(60), || ledger_rcpts(&first).len()
            >= 300
            || !alive(run.pid())),
        "no progress\n{}",
        tail(&run.stderr_now(), 3000)
    );
    sink.kill_all();
    let at_outage = ledger_rcpts(&first).len();
    assert!(
        at_outage < N,
        "campaign finished before the outage; raise N"
    );
    std::thread::sleep(Duration::from_secs(10));
    assert!(alive(run.pid()), "the governor gave up during the outage");
    let _sink2 = sink_on(port, &second);
    let out = run.wait(Duration::from_secs(240));
    out.expect_code(0);
    let sum = out.summary();
    assert_eq!(sum["delivered"], N as u64, "summary {sum}");
    assert_eq!(sum["bounced"], 0, "summary {sum}");
    assert_eq!(sum["expired"], 0, "summary {sum}");
    assert!(
        sum["deferred"].as_u64().unwrap_or(0) > 0,
        "nothing was deferred during the outage: {sum}"
    );
    let log = camp.delivery_log();
    let refused = log
        .iter()
        .filter(|l| l["outcome"] == "deferred" && l["stage"] == "connect")
        .count();
    assert!(refused > 0, "no deferral at connect in delivery.jsonl");
    assert!(
        log.iter().all(|l| l["outcome"] != "bounced"),
        "a job bounced"
    );
    let got: BTreeSet<String> = ledger_rcpts(&first)
        .into_iter()
        .chain(ledger_rcpts(&second))
        .collect();
    assert_eq!(got.len(), N, "recipients that reached a receiver");
    eprintln!(
        "outage: {at_outage} delivered before, {refused} attempts deferred at connect, {} after",
        ledger_rcpts(&second).len()
    );
}
