//! The retry policy end to end: the real `governor` and `mta-worker` binaries against a receiver
//! that refuses every message with a 4xx (`governor sink --tempfail-pct 100`), and against a
//! scripted receiver that records what each attempt carried.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;

fn governor() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_governor"))
}

/// target/<profile>/mta-worker, built first if it is not there yet.
fn worker() -> PathBuf {
    let gov = governor();
    let dir = gov.parent().expect("target/<profile>");
    let w = dir.join("mta-worker");
    if !w.exists() {
        let mut cmd = Command::new(env!("CARGO"));
        cmd.args(["build", "-p", "mta-worker"]);
        if dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        let st = cmd.status().expect("cargo build -p mta-worker");
        assert!(st.success(), "cargo build -p mta-worker failed");
    }
    assert!(w.exists(), "{} missing", w.display());
    w
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("governor-retry-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `governor sink` on a free loopback port; killed on drop.
struct Sink {
    child: Child,
    port: u16,
}

impl Sink {
    fn start(args: &[&str]) -> Sink {
        let mut child = Command::new(governor())
            .args(["sink", "--listen", "127.0.0.1:0"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn governor sink");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .strip_prefix("sink listening on ")
            .unwrap_or_else(|| panic!("sink said {line:?}"));
        let port = addr.rsplit(':').next().unwrap().parse().unwrap();
        Sink { child, port }
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes a campaign of `n` recipients and a config with `retry` as its [retry] table.
fn write_config(dir: &Path, port: u16, n: usize, retry: &str) -> PathBuf {
    let mut csv = String::from("email,name\n");
    for i in 0..n {
        csv.push_str(&format!("user{i}@example.org,User {i}\n"));
    }
    std::fs::write(dir.join("r.csv"), csv).unwrap();
    std::fs::write(
        dir.join("t.eml"),
        "From: News <news@example.com>\nTo: {{ name }} <{{ email }}>\nSubject: Hello {{ name }}\n\nHi {{ name }}.\n",
    )
    .unwrap();
    let cfg = format!(
        "target_rate = 300\nmin_workers = 1\nmax_workers = 2\nsessions = 4\ncontrol_interval = 0.2\n\
         [supervisor]\nshutdown_grace = 5\n\
         [relay]\nport = {port}\n\
         [retry]\n{retry}\n\
         [[campaign]]\nname = \"retry\"\nrecipients = \"r.csv\"\ntemplate = \"t.eml\"\nsender = \"bounces@example.com\"\n"
    );
    let p = dir.join("governor.toml");
    std::fs::write(&p, cfg).unwrap();
    p
}

/// Runs `governor run --json` to the end and returns the summary object.
fn run(config: &Path) -> Value {
    let out = Command::new(governor())
        .args(["run", "--json", "--config"])
        .arg(config)
        .arg("--worker")
        .arg(worker())
        .stderr(Stdio::piped())
        .output()
        .expect("governor run");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "governor run failed ({}): {stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.lines().last().expect("summary line")).unwrap()
}

fn jsonl(p: &Path) -> Vec<Value> {
    std::fs::read_to_string(p)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// A fixed limit of 3 against a receiver that always says 451: every job is tried exactly three
/// times, with the same Message-ID, and ends expired with the receiver's last reply as reason.
#[test]
fn every_job_expires_after_exactly_max_attempts_with_the_last_reply() {
    let d = TempDir::new("fixed");
    let sink = Sink::start(&["--tempfail-pct", "100"]);
    let n = 30;
    let config = write_config(
        &d.0,
        sink.port,
        n,
        "max_attempts = 3\nmin_interval = 0.05\nmax_interval = 0.2",
    );
    let s = run(&config);
    assert_eq!(s["status"], "complete", "{s}");
    assert_eq!(s["total"], n, "{s}");
    assert_eq!(s["expired"], n, "expired = total: {s}");
    assert_eq!(s["bounced"], 0, "{s}");
    assert_eq!(s["delivered"], 0, "{s}");
    assert_eq!(s["attempts"], 3 * n, "{s}");

    let log = jsonl(&d.0.join("var/log/delivery.jsonl"));
    assert_eq!(log.len(), 3 * n);
    for job in 1..=n as u64 {
        let mine: Vec<&Value> = log.iter().filter(|l| l["job"] == job).collect();
        let seen: Vec<(u64, &str)> = mine
            .iter()
            .map(|l| {
                (
                    l["attempt"].as_u64().unwrap(),
                    l["outcome"].as_str().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            seen,
            vec![(1, "deferred"), (2, "deferred"), (3, "expired")],
            "job {job}"
        );
        let last = mine[2];
        assert_eq!(last["code"], 451, "{last}");
        let reply = last["reply"].as_str().unwrap();
        assert!(reply.contains("Try again later"), "{last}");
        assert!(
            mine.iter()
                .all(|l| l["message_id"] == mine[0]["message_id"]),
            "same Message-ID on every attempt: {mine:?}"
        );
    }
    // The spool keeps the last reply as the expired job's reason.
    let db = rusqlite::Connection::open(d.0.join("var/spool.db")).unwrap();
    let rows: Vec<(String, i64, i64, String)> = db
        .prepare("SELECT state, attempts, last_code, last_text FROM jobs")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(rows.len(), n);
    for (state, attempts, code, text) in rows {
        assert_eq!((state.as_str(), attempts, code), ("expired", 3, 451));
        assert!(text.contains("Try again later"), "{text}");
    }
    // A fixed limit: every control-log line says 3.
    let ctl = jsonl(&d.0.join("var/log/control.jsonl"));
    assert!(!ctl.is_empty());
    assert!(ctl.iter().all(|l| l["retry_limit"] == 3), "{:?}", ctl[0]);
}

/// The adaptive limit in the running governor: with every attempt failing, the failure-rate
/// input lowers the limit tick by tick to min_attempts, the control log shows the value and its
/// inputs, and jobs expire at the lowered limit with the last reply.
#[test]
fn failure_rate_lowers_the_limit_in_the_running_governor() {
    let d = TempDir::new("adaptive");
    let sink = Sink::start(&["--tempfail-pct", "100"]);
    let n = 200;
    let config = write_config(
        &d.0,
        sink.port,
        n,
        "max_attempts = 5\nmin_attempts = 2\nadapt = [\"failure_rate\"]\nmin_interval = 0.5\nmax_interval = 1",
    );
    let s = run(&config);
    assert_eq!(
        (s["expired"].as_u64(), s["bounced"].as_u64()),
        (Some(n as u64), Some(0)),
        "{s}"
    );
    let ctl = jsonl(&d.0.join("var/log/control.jsonl"));
    let lowered = ctl
        .iter()
        .find(|l| l["retry_limit"] == 2)
        .unwrap_or_else(|| panic!("limit never reached 2: {:?}", ctl.last()));
    assert_eq!(lowered["retry_inputs"]["failure_rate"], 1.0, "{lowered}");
    assert!(
        lowered["retry_reason"]
            .as_str()
            .unwrap()
            .contains("failure_rate 1.000 > failure_high 0.2: -1"),
        "{lowered}"
    );
    // Limits only step down here, one step per tick: 5, 4, 3, 2.
    let limits: Vec<u64> = ctl
        .iter()
        .map(|l| l["retry_limit"].as_u64().unwrap())
        .collect();
    assert!(
        limits.windows(2).all(|w| w[1] <= w[0] && w[0] - w[1] <= 1),
        "{limits:?}"
    );
    let log = jsonl(&d.0.join("var/log/delivery.jsonl"));
    let expired: Vec<&Value> = log.iter().filter(|l| l["outcome"] == "expired").collect();
    assert_eq!(expired.len(), n);
    assert!(expired.iter().all(|l| l["code"] == 451));
    let at_two = expired.iter().filter(|l| l["attempt"] == 2).count();
    assert!(
        at_two > n / 2,
        "most jobs expire at the lowered limit 2: {at_two} of {n}"
    );
    assert!(expired.iter().all(|l| l["attempt"].as_u64().unwrap() >= 2));
}

/// What one transaction carried, as the scripted receiver saw it.
#[derive(Debug, Clone)]
struct Seen {
    mail_from: String,
    rcpt: String,
    message_id: String,
}

/// A scripted SMTP receiver: answers 451 after the final dot to the first `fail` transactions
/// of each recipient and 250 after that, and records every transaction.
fn scripted_receiver(fail: usize) -> (u16, Arc<Mutex<Vec<Seen>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let all = seen.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { break };
            let all = all.clone();
            std::thread::spawn(move || {
                let _ = session(conn, fail, &all);
            });
        }
    });
    (port, seen)
}

fn session(conn: TcpStream, fail: usize, all: &Mutex<Vec<Seen>>) -> std::io::Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut out = conn.try_clone()?;
    let mut r = BufReader::new(conn);
    out.write_all(b"220 scripted ESMTP\r\n")?;
    let (mut from, mut rcpt) = (String::new(), String::new());
    let mut line = String::new();
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let upper = line.to_ascii_uppercase();
        if upper.starts_with("EHLO") {
            out.write_all(b"250-scripted\r\n250 8BITMIME\r\n")?;
        } else if upper.starts_with("MAIL FROM:") {
            from = line[10..].trim().to_string();
            out.write_all(b"250 2.1.0 Ok\r\n")?;
        } else if upper.starts_with("RCPT TO:") {
            rcpt = line[8..].trim().to_string();
            out.write_all(b"250 2.1.5 Ok\r\n")?;
        } else if upper.starts_with("DATA") {
            out.write_all(b"354 End data with <CR><LF>.<CR><LF>\r\n")?;
            let mut message_id = String::new();
            loop {
                line.clear();
                if r.read_line(&mut line)? == 0 {
                    return Ok(());
                }
                if line == ".\r\n" {
                    break;
                }
                if line.to_ascii_lowercase().starts_with("message-id:") && message_id.is_empty() {
                    message_id = line[11..].trim().to_string();
                }
            }
            let mut v = all.lock().unwrap();
            let before = v.iter().filter(|s| s.rcpt == rcpt).count();
            v.push(Seen {
                mail_from: from.clone(),
                rcpt: rcpt.clone(),
                message_id,
            });
            drop(v);
            if before < fail {
                out.write_all(b"451 4.7.1 Greylisted, try again\r\n")?;
            } else {
                out.write_all(b"250 2.0.0 Ok\r\n")?;
            }
        } else if upper.starts_with("QUIT") {
            out.write_all(b"221 Bye\r\n")?;
            return Ok(());
        } else {
            out.write_all(b"250 Ok\r\n")?;
        }
    }
}

/// On the wire, every attempt of a job carries the same Message-ID and envelope sender; a job
/// greylisted twice is delivered on its third attempt.
#[test]
fn every_attempt_carries_the_same_message_id_and_envelope_sender() {
    let d = TempDir::new("wire");
    let (port, seen) = scripted_receiver(2);
    let n = 10;
    let config = write_config(
        &d.0,
        port,
        n,
        "max_attempts = 5\nmin_interval = 0.05\nmax_interval = 0.2",
    );
    let s = run(&config);
    assert_eq!(
        (s["delivered"].as_u64(), s["expired"].as_u64()),
        (Some(n as u64), Some(0)),
        "{s}"
    );
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 3 * n, "{seen:?}");
    for i in 0..n {
        let rcpt = format!("<user{i}@example.org>");
        let mine: Vec<&Seen> = seen.iter().filter(|s| s.rcpt == rcpt).collect();
        assert_eq!(mine.len(), 3, "{rcpt}: {mine:?}");
        assert!(!mine[0].message_id.is_empty(), "{mine:?}");
        for s in &mine {
            assert_eq!(s.message_id, mine[0].message_id, "{rcpt}");
            assert_eq!(s.mail_from, "<bounces@example.com>", "{rcpt}");
        }
    }
}
