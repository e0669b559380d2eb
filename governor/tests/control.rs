//! The control loop end to end, with the real `governor` and `mta-worker` binaries and the
//! built-in sink on loopback: a target change by SIGHUP moves the measured rate and the worker
//! count in the right direction, and killed workers are replaced within the restart policy.
//! Direction checks with wide margins only; no wall-clock speed is asserted.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use governor::sink::{self, SinkOptions};

fn worker_binary() -> PathBuf {
    let gov = PathBuf::from(env!("CARGO_BIN_EXE_governor"));
    let dir = gov.parent().expect("target dir").to_path_buf();
    let worker = dir.join("mta-worker");
    if !worker.exists() {
        let mut cmd = Command::new(env!("CARGO"));
        cmd.args(["build", "-p", "mta-worker"]);
        if dir.ends_with("release") {
            cmd.arg("--release");
        }
        let st = cmd.status().expect("cargo build -p mta-worker");
        assert!(st.success(), "building mta-worker failed");
    }
    worker
}

struct Run {
    dir: PathBuf,
    child: Child,
    stderr: std::sync::mpsc::Receiver<String>,
    log: Vec<String>,
}

impl Drop for Run {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn config(port: u16, rate: f64) -> String {
    format!(
        "target_rate = {rate}\nmin_workers = 1\nmax_workers = 30\nsessions = 1\ncontrol_interval = 0.5\n\
         [supervisor]\nrestart_intensity = 20\nrestart_period = 30\n\
         [relay]\nport = {port}\n\
         [retry]\nmin_interval = 1\n\
         [[campaign]]\nname = \"ctl\"\nrecipients = \"r.csv\"\ntemplate = \"t.eml\"\nsender = \"s@ctl.example\"\n"
    )
}

fn start(name: &str, port: u16, rate: f64) -> Run {
    let dir = std::env::temp_dir().join(format!("governor-control-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut csv = String::from("email,name\n");
    for i in 0..40_000 {
        csv.push_str(&format!("u{i}@ctl.example,N{i}\n"));
    }
    std::fs::write(dir.join("r.csv"), csv).unwrap();
    std::fs::write(
        dir.join("t.eml"),
        "From: a@ctl.example\nTo: {{ email }}\nSubject: hi {{ name }}\n\nHello\n",
    )
    .unwrap();
    std::fs::write(dir.join("g.toml"), config(port, rate)).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_governor"))
        .args(["run", "--config", "g.toml", "--worker"])
        .arg(worker_binary())
        .current_dir(&dir)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn governor");
    let err = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    Run {
        dir,
        child,
        stderr: rx,
        log: Vec::new(),
    }
}

impl Run {
    fn pump(&mut self) {
        while let Ok(l) = self.stderr.try_recv() {
            self.log.push(l);
        }
    }

    fn ticks(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.dir.join("var/log/control.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Waits until the control log has `n` more ticks than now.
    fn wait_ticks(&mut self, n: usize, limit: Duration) {
        let have = self.ticks().len();
        let t0 = Instant::now();
        while self.ticks().len() < have + n {
            assert!(t0.elapsed() < limit, "control log stalled");
            assert!(
                self.child.try_wait().unwrap().is_none(),
                "governor exited: {:?}",
                self.log
            );
            self.pump();
            std::thread::sleep(Duration::from_millis(100));
        }
        self.pump();
    }

    /// Mean throughput and mean allocated workers over the last `n` ticks.
    fn recent(&self, n: usize) -> (f64, f64) {
        let t = self.ticks();
        let last = &t[t.len().saturating_sub(n)..];
        let f = |k: &str| {
            last.iter()
                .map(|v| v[k].as_f64().unwrap_or(0.0))
                .sum::<f64>()
        };
        (
            f("throughput") / last.len() as f64,
            (f("workers") + f("starting")) / last.len() as f64,
        )
    }

    fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), sig).unwrap();
    }
}

fn sink() -> sink::SinkHandle {
    sink::start(SinkOptions {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        latency_ms: 20,
        latency_sigma: 0.0,
        tempfail_pct: 0.0,
        permfail_pct: 0.0,
        dump: None,
        profile: Default::default(),
    })
    .expect("sink")
}

/// Children of `pid` (from /proc), i.e. the worker processes.
fn children(pid: u32) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(p) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if let Ok(stat) =
            std::fs::read_to_string(Path::new("/proc").join(p.to_string()).join("stat"))
            && let Some(rest) = stat.rsplit_once(')').map(|x| x.1)
            && rest.split_whitespace().nth(1) == Some(&pid.to_string())
        {
            out.push(p);
        }
    }
    out.sort();
    out
}

#[test]
fn sighup_target_change_moves_rate_and_workers_in_the_right_direction() {
    let s = sink();
    let mut run = start("hup", s.addr.port(), 40.0);
    run.wait_ticks(8, Duration::from_secs(60));
    let (r_low, n_low) = run.recent(4);
    assert!(r_low > 10.0 && r_low < 60.0, "rate at 40/s target: {r_low}");
    // up: 4x the target
    std::fs::write(run.dir.join("g.toml"), config(s.addr.port(), 160.0)).unwrap();
    run.signal(nix::sys::signal::Signal::SIGHUP);
    run.wait_ticks(10, Duration::from_secs(60));
    let (r_high, n_high) = run.recent(4);
    assert!(
        r_high > 2.0 * r_low,
        "rate did not rise: {r_low} -> {r_high}"
    );
    assert!(n_high > n_low, "workers did not rise: {n_low} -> {n_high}");
    assert!(
        run.log.iter().any(|l| l.contains("target_rate 40 -> 160")),
        "reload not logged"
    );
    let t = run.ticks();
    assert!(
        t.iter().any(|v| v["reason"]
            .as_str()
            .unwrap_or("")
            .contains("target 40.0/s -> 160.0/s")),
        "the control log does not explain the change"
    );
    // down again: the rate falls at once (pacer); workers follow after the scale-down window
    std::fs::write(run.dir.join("g.toml"), config(s.addr.port(), 40.0)).unwrap();
    run.signal(nix::sys::signal::Signal::SIGHUP);
    run.wait_ticks(16, Duration::from_secs(60));
    let (r_back, n_back) = run.recent(3);
    assert!(
        r_back < 0.6 * r_high,
        "rate did not fall: {r_high} -> {r_back}"
    );
    assert!(
        n_back < n_high,
        "workers did not fall: {n_high} -> {n_back}"
    );
    run.signal(nix::sys::signal::Signal::SIGTERM);
    let st = run.child.wait().unwrap();
    assert_eq!(st.code(), Some(3), "{:?}", run.log);
}

#[test]
fn killed_workers_are_replaced_within_the_restart_policy() {
    let s = sink();
    let mut run = start("kill", s.addr.port(), 200.0);
    run.wait_ticks(8, Duration::from_secs(60));
    let kids = children(run.child.id());
    assert!(
        kids.len() >= 4,
        "expected a pool of several workers, got {kids:?}"
    );
    let victims: Vec<i32> = kids[..kids.len() / 4].to_vec();
    for &v in &victims {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(v),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    // replaced: as many workers as before, none of them a victim, within 20 s
    let t0 = Instant::now();
    loop {
        run.pump();
        let now = children(run.child.id());
        if now.len() >= kids.len() && !now.iter().any(|p| victims.contains(p)) {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "workers not replaced: before {kids:?}, killed {victims:?}, now {now:?}"
        );
        assert!(
            run.child.try_wait().unwrap().is_none(),
            "governor exited: {:?}",
            run.log
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    run.wait_ticks(4, Duration::from_secs(30));
    let (rate, _) = run.recent(2);
    assert!(rate > 50.0, "delivery did not go on after the kill: {rate}");
    assert!(
        run.log.iter().filter(|l| l.contains("died")).count() >= victims.len(),
        "the deaths are not logged as failures: {:?}",
        run.log
    );
    run.signal(nix::sys::signal::Signal::SIGTERM);
    let st = run.child.wait().unwrap();
    assert_eq!(st.code(), Some(3));
}
