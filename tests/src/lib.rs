//! Helpers for the integration tests.
//!
//! # Layout
//! - [`bins`]: builds the real `governor` and `mta-worker` binaries once per test process (the
//!   tests crate is a separate package, so cargo does not build them for it) and returns their paths.
//! - [`TestDir`]: a fresh directory under `std::env::temp_dir()`, removed on success, kept (and
//!   named on stderr) when the test panics.
//! - [`Proc`]: a spawned child that is SIGKILLed on drop, together with every process it started
//!   (the governor's workers sit in their own process groups, so they are looked up through
//!   `/proc/<pid>/task/*/children` and killed by group).
//! - [`Peer`]: a real SMTP receiver on a free loopback port: Postfix `smtp-sink`, Python aiosmtpd
//!   (`peers/aiosmtpd_store.py`) or `governor sink`, and [`Peer::messages`] to read what it stored.
//! - [`Campaign`]: writes a config file, recipients and templates for `governor run`.
//! - [`GovernorRun`] / [`run_governor`]: run the governor with `--json` and read its summary.
//! - Spool, delivery-log and message helpers: [`spool_states`], [`spool_jobs`], [`read_jsonl`],
//!   [`parse_mail`] (Python's `email` package as an independent parser), [`header_names`],
//!   [`line_faults`], [`domain_to_ascii`], [`parse_csv`], [`render`].
//!
//! No helper needs the internet; every server listens on 127.0.0.1.

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use serde_json::Value;

pub use nix::sys::signal::Signal as Sig;

/// The workspace root (the directory holding the workspace Cargo.toml).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// `tests/peers/`: the scripts of the Python peers.
pub fn peers_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("peers")
}

/// The shared test corpus: `$GOVERNOR_CORPUS`, else `shared/corpus` beside the work tree (where CI
/// puts its copy of shared/), else `/work/shared/corpus`.
pub fn corpus_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("GOVERNOR_CORPUS") {
        return PathBuf::from(p);
    }
    let beside = workspace_root().join("../shared/corpus");
    if beside.is_dir() {
        return beside;
    }
    PathBuf::from("/work/shared/corpus")
}

/// The Python interpreter for the Python peers: `$GOVERNOR_TEST_PYTHON` or `python3`.
pub fn python() -> String {
    std::env::var("GOVERNOR_TEST_PYTHON").unwrap_or_else(|_| "python3".into())
}

// ---------------------------------------------------------------------------------------------
// Binaries

/// Paths of the real binaries under test.
#[derive(Debug)]
pub struct Bins {
    /// `target/<profile>/governor`
    pub governor: PathBuf,
    /// `target/<profile>/mta-worker`
    pub worker: PathBuf,
}

/// Builds `governor` and `mta-worker` once per test process, in the profile this test binary was
/// built with (`--release` when it lives under target/release), and returns their paths.
pub fn bins() -> &'static Bins {
    static BINS: OnceLock<Bins> = OnceLock::new();
    BINS.get_or_init(build_bins)
}

fn build_bins() -> Bins {
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test>-<hash>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary lives in target/<profile>/deps")
        .to_path_buf();
    let target_dir = profile_dir.parent().expect("target dir").to_path_buf();
    let profile = profile_dir
        .file_name()
        .expect("profile")
        .to_string_lossy()
        .into_owned();
    let mut cmd = Command::new(env!("CARGO"));
    cmd.current_dir(workspace_root())
        .args(["build", "--bins", "-p", "governor", "-p", "mta-worker"])
        .env("CARGO_TARGET_DIR", &target_dir);
    match profile.as_str() {
        "debug" => {}
        "release" => {
            cmd.arg("--release");
        }
        other => {
            cmd.args(["--profile", other]);
        }
    }
    let out = cmd.output().expect("run cargo build");
    assert!(
        out.status.success(),
        "cargo build --bins -p governor -p mta-worker failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let bins = Bins {
        governor: profile_dir.join("governor"),
        worker: profile_dir.join("mta-worker"),
    };
    assert!(
        bins.governor.is_file(),
        "missing {}",
        bins.governor.display()
    );
    assert!(bins.worker.is_file(), "missing {}", bins.worker.display());
    bins
}

// ---------------------------------------------------------------------------------------------
// Temporary directories

/// A fresh directory under `std::env::temp_dir()`. Removed on drop, unless the thread is
/// panicking (then it is kept for inspection and its path printed) or `GOVERNOR_KEEP_TMP` is set.
#[derive(Debug)]
pub struct TestDir {
    path: PathBuf,
}

impl TestDir {
    /// Creates `governor-it-<name>-<pid>-<n>`, mode 0755 (smtp-sink runs as `nobody` and must
    /// reach its dump directory below it).
    pub fn new(name: &str) -> TestDir {
        static N: AtomicU64 = AtomicU64::new(0);
        let n = N.fetch_add(1, Ordering::SeqCst);
        let path =
            std::env::temp_dir().join(format!("governor-it-{name}-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).expect("create test dir");
        set_mode(&path, 0o755);
        TestDir { path }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `self.path().join(rel)`.
    pub fn join(&self, rel: &str) -> PathBuf {
        self.path.join(rel)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if std::thread::panicking() || std::env::var_os("GOVERNOR_KEEP_TMP").is_some() {
            eprintln!("test files kept in {}", self.path.display());
        } else {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

fn set_mode(p: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(p, fs::Permissions::from_mode(mode)).expect("chmod");
}

// ---------------------------------------------------------------------------------------------
// Processes

/// A spawned child process, SIGKILLed on drop together with every process it started.
#[derive(Debug)]
pub struct Proc {
    /// What it is, for messages.
    pub name: String,
    child: Child,
    status: Option<ExitStatus>,
}

impl Proc {
    /// Spawns `cmd`; `name` is used in messages.
    pub fn spawn(name: &str, cmd: &mut Command) -> Proc {
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {name}: {e}"));
        Proc {
            name: name.to_string(),
            child,
            status: None,
        }
    }

    /// The child's pid.
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// The exit status if it has exited.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            self.status = self.child.try_wait().expect("try_wait");
        }
        self.status
    }

    /// Waits up to `timeout` for the exit; `None` if still running.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let end = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_wait() {
                return Some(s);
            }
            if Instant::now() >= end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `sig` to the child.
    pub fn signal(&self, sig: Signal) {
        if self.status.is_none() {
            kill(Pid::from_raw(self.pid()), sig)
                .unwrap_or_else(|e| panic!("kill {sig} {}: {e}", self.name));
        }
    }

    /// Kills the child and everything it started, then reaps it.
    pub fn kill_all(&mut self) {
        if self.try_wait().is_some() {
            return;
        }
        let tree = descendants(self.pid());
        let _ = kill(Pid::from_raw(self.pid()), Signal::SIGKILL);
        for p in &tree {
            let _ = killpg(Pid::from_raw(*p), Signal::SIGKILL);
            let _ = kill(Pid::from_raw(*p), Signal::SIGKILL);
        }
        self.status = self.child.wait().ok();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill_all();
    }
}

/// Direct children of `pid` (all threads), from `/proc/<pid>/task/*/children`.
pub fn children(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in tasks.flatten() {
        if let Ok(s) = fs::read_to_string(t.path().join("children")) {
            out.extend(s.split_whitespace().filter_map(|x| x.parse::<i32>().ok()));
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// All descendants of `pid`, depth first.
pub fn descendants(pid: i32) -> Vec<i32> {
    let mut out = Vec::new();
    for c in children(pid) {
        out.push(c);
        out.extend(descendants(c));
    }
    out
}

/// The process name (`/proc/<pid>/comm`), `None` if gone.
pub fn comm(pid: i32) -> Option<String> {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|s| s.trim().to_string())
}

/// True while `pid` exists and is not a zombie.
pub fn alive(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        // "pid (comm) S ...": the state follows the last ')'.
        Ok(s) => s
            .rsplit_once(')')
            .map(|(_, r)| r.trim_start())
            .is_some_and(|r| !r.starts_with('Z') && !r.starts_with('X')),
        Err(_) => false,
    }
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes; returns whether it held.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind :0")
        .local_addr()
        .expect("local_addr")
        .port()
}

// ---------------------------------------------------------------------------------------------
// SMTP peers

/// Which receiver a [`Peer`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerKind {
    /// Postfix `smtp-sink -d`: dumps with its own trace headers, LF line ends, no SMTPUTF8.
    SmtpSink,
    /// Python aiosmtpd via `peers/aiosmtpd_store.py`: exact bytes, SMTPUTF8 and 8BITMIME offered.
    Aiosmtpd,
    /// `governor sink --dump`: exact bytes plus `ledger.jsonl`.
    GovernorSink,
}

/// A running SMTP receiver on 127.0.0.1.
#[derive(Debug)]
pub struct Peer {
    /// Which receiver.
    pub kind: PeerKind,
    /// Its port.
    pub port: u16,
    /// Where it stores messages.
    pub dir: PathBuf,
    /// The process (killed on drop).
    pub proc: Proc,
    log: PathBuf,
}

/// One message as a receiver stored it.
#[derive(Debug, Clone)]
pub struct Stored {
    /// The file it came from.
    pub file: PathBuf,
    /// Envelope sender (without `<>`).
    pub mail_from: String,
    /// Parameters of MAIL FROM (`BODY=8BITMIME`, `SMTPUTF8`, ...), upper-case.
    pub mail_params: Vec<String>,
    /// Envelope recipients (without `<>`).
    pub rcpt: Vec<String>,
    /// The message bytes without the receiver's own trace lines. For smtp-sink the line ends are
    /// LF (it stores lines, not bytes) and its extra final empty line is removed.
    pub data: Vec<u8>,
    /// True when `data` is byte-exact as received (aiosmtpd, governor sink).
    pub exact: bool,
}

impl Peer {
    /// Postfix `smtp-sink` dumping every message to `dir` (`-d dir/%Y%m%d%H%M%S.`: one file per
    /// transaction; it removes the file of an aborted transaction). As root it needs `-u nobody`,
    /// so `dir` is made world-writable. `extra` goes before the address.
    pub fn smtp_sink(dir: &Path, extra: &[&str]) -> Peer {
        fs::create_dir_all(dir).expect("create dump dir");
        set_mode(dir, 0o777);
        let bin = std::env::var("SMTP_SINK").unwrap_or_else(|_| "/usr/sbin/smtp-sink".into());
        assert!(
            Path::new(&bin).exists(),
            "{bin} not found: install Debian's postfix (see .ci/run)"
        );
        let template = format!("{}/%Y%m%d%H%M%S.", dir.display());
        Self::start(PeerKind::SmtpSink, dir, |port, log| {
            let mut c = Command::new(&bin);
            if nix::unistd::geteuid().is_root() {
                c.args(["-u", "nobody"]);
            }
            c.args(["-d", &template])
                .args(extra)
                .arg(format!("127.0.0.1:{port}"))
                .arg("256");
            c.stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log);
            c
        })
    }

    /// Python aiosmtpd (`peers/aiosmtpd_store.py`) storing exact bytes and envelopes in `dir`.
    pub fn aiosmtpd(dir: &Path) -> Peer {
        fs::create_dir_all(dir).expect("create store dir");
        let script = peers_dir().join("aiosmtpd_store.py");
        Self::start(PeerKind::Aiosmtpd, dir, |port, log| {
            let mut c = Command::new(python());
            c.arg(&script)
                .args(["--port", &port.to_string(), "--dir"])
                .arg(dir);
            c.stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log);
            c
        })
    }

    /// `governor sink --dump dir` with `extra` options (e.g. `--latency-ms 5`).
    pub fn governor_sink(dir: &Path, extra: &[&str]) -> Peer {
        let gov = bins().governor.clone();
        Self::start(PeerKind::GovernorSink, dir, |port, log| {
            let mut c = Command::new(&gov);
            c.args(["sink", "--listen", &format!("127.0.0.1:{port}"), "--dump"])
                .arg(dir)
                .args(extra);
            c.stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log);
            c
        })
    }

    fn start(kind: PeerKind, dir: &Path, mut make: impl FnMut(u16, fs::File) -> Command) -> Peer {
        let mut last = String::new();
        // A free port can be taken between the probe and the bind: try a few.
        for attempt in 0..5 {
            let port = free_port();
            let log = dir.with_extension(format!("peer{attempt}.log"));
            let f = fs::File::create(&log).expect("peer log");
            let mut proc = Proc::spawn(&format!("{kind:?}"), &mut make(port, f));
            let up = wait_until(Duration::from_secs(20), || {
                proc.try_wait().is_some() || TcpStream::connect(("127.0.0.1", port)).is_ok()
            });
            if up && proc.try_wait().is_none() {
                return Peer {
                    kind,
                    port,
                    dir: dir.to_path_buf(),
                    proc,
                    log,
                };
            }
            last = fs::read_to_string(&log).unwrap_or_default();
        }
        panic!("{kind:?} did not start listening; its output:\n{last}");
    }

    /// The receiver's own output so far.
    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Every message stored so far.
    pub fn messages(&self) -> Vec<Stored> {
        match self.kind {
            PeerKind::SmtpSink => read_smtp_sink_dir(&self.dir),
            PeerKind::Aiosmtpd => read_aiosmtpd_dir(&self.dir),
            PeerKind::GovernorSink => read_governor_sink_dir(&self.dir),
        }
    }

    /// How many messages are stored so far (cheap: counts files).
    pub fn count(&self) -> usize {
        let Ok(rd) = fs::read_dir(&self.dir) else {
            return 0;
        };
        match self.kind {
            PeerKind::SmtpSink => rd.flatten().filter(|e| e.path().is_file()).count(),
            PeerKind::Aiosmtpd => rd
                .flatten()
                .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
                .count(),
            PeerKind::GovernorSink => fs::read_to_string(self.dir.join("ledger.jsonl"))
                .map(|s| s.lines().count())
                .unwrap_or(0),
        }
    }
}

/// Splits `<addr> PARAM PARAM` into the address and the parameters (quotes inside `<>` respected).
pub fn split_path_args(s: &str) -> (String, Vec<String>) {
    let s = s.trim();
    if let Some(rest) = s.strip_prefix('<') {
        let mut in_quote = false;
        let mut esc = false;
        for (i, c) in rest.char_indices() {
            match c {
                _ if esc => esc = false,
                '\\' if in_quote => esc = true,
                '"' => in_quote = !in_quote,
                '>' if !in_quote => {
                    let params = rest[i + 1..]
                        .split_whitespace()
                        .map(|p| p.to_ascii_uppercase())
                        .collect();
                    return (rest[..i].to_string(), params);
                }
                _ => {}
            }
        }
    }
    let mut it = s.split_whitespace();
    let a = it.next().unwrap_or("").to_string();
    (a, it.map(|p| p.to_ascii_uppercase()).collect())
}

fn sorted_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| p.is_file())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Parses one smtp-sink dump: its X-* lines and three-line Received header come first, then the
/// message as received (LF line ends), then one empty line.
pub fn parse_smtp_sink_dump(file: &Path, raw: &[u8]) -> Stored {
    let mut pos = 0;
    let mut mail_from = String::new();
    let mut mail_params = Vec::new();
    let mut rcpt = Vec::new();
    let mut seen_received = false;
    while pos < raw.len() {
        let end = raw[pos..]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(raw.len(), |i| pos + i + 1);
        let line = String::from_utf8_lossy(&raw[pos..end])
            .trim_end_matches('\n')
            .to_string();
        if seen_received {
            if line.starts_with('\t') || line.starts_with(' ') {
                pos = end;
                continue;
            }
            break;
        }
        if let Some(v) = line.strip_prefix("X-Mail-Args: ") {
            (mail_from, mail_params) = split_path_args(v);
        } else if let Some(v) = line.strip_prefix("X-Rcpt-Args: ") {
            rcpt.push(split_path_args(v).0);
        } else if line.starts_with("Received: ") {
            seen_received = true;
        } else if !(line.starts_with("X-Client-Addr: ")
            || line.starts_with("X-Client-Proto: ")
            || line.starts_with("X-Helo-Args: "))
        {
            panic!(
                "{}: unexpected smtp-sink trace line {line:?}",
                file.display()
            );
        }
        pos = end;
    }
    assert!(
        seen_received,
        "{}: no smtp-sink Received header",
        file.display()
    );
    let mut data = raw[pos..].to_vec();
    assert!(
        data.ends_with(b"\n\n") || data == b"\n",
        "{}: smtp-sink dump lacks its final empty line",
        file.display()
    );
    data.pop();
    Stored {
        file: file.to_path_buf(),
        mail_from,
        mail_params,
        rcpt,
        data,
        exact: false,
    }
}

fn read_smtp_sink_dir(dir: &Path) -> Vec<Stored> {
    sorted_files(dir)
        .into_iter()
        .filter(|p| !p.file_name().unwrap().to_string_lossy().starts_with('.'))
        .map(|p| {
            let raw = fs::read(&p).expect("read dump");
            parse_smtp_sink_dump(&p, &raw)
        })
        .collect()
}

fn read_aiosmtpd_dir(dir: &Path) -> Vec<Stored> {
    let mut out: Vec<(u64, Stored)> = Vec::new();
    for p in sorted_files(dir) {
        if p.extension().is_none_or(|x| x != "json")
            || p.file_name().unwrap().to_string_lossy().starts_with('.')
        {
            continue;
        }
        let meta: Value = serde_json::from_slice(&fs::read(&p).unwrap()).expect("aiosmtpd json");
        let eml = p.with_extension("eml");
        let strs = |k: &str| -> Vec<String> {
            meta[k]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|v| v.as_str().unwrap_or("").to_string())
                        .collect()
                })
                .unwrap_or_default()
        };
        out.push((
            meta["seq"].as_u64().unwrap_or(0),
            Stored {
                data: fs::read(&eml).expect("aiosmtpd eml"),
                file: eml,
                mail_from: meta["mail_from"].as_str().unwrap_or("").to_string(),
                mail_params: strs("mail_options")
                    .into_iter()
                    .map(|s| s.to_ascii_uppercase())
                    .collect(),
                rcpt: strs("rcpt_tos"),
                exact: true,
            },
        ));
    }
    out.sort_by_key(|(s, _)| *s);
    out.into_iter().map(|(_, s)| s).collect()
}

fn read_governor_sink_dir(dir: &Path) -> Vec<Stored> {
    read_jsonl(&dir.join("ledger.jsonl"))
        .into_iter()
        .map(|l| {
            let seq = l["seq"].as_u64().expect("ledger seq");
            let file = dir.join(format!("{seq}.eml"));
            Stored {
                data: fs::read(&file).unwrap_or_default(),
                file,
                mail_from: l["mail_from"]
                    .as_str()
                    .unwrap_or("")
                    .trim_matches(['<', '>'])
                    .to_string(),
                mail_params: Vec::new(),
                rcpt: l["rcpt"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .map(|v| {
                                v.as_str()
                                    .unwrap_or("")
                                    .trim_matches(['<', '>'])
                                    .to_string()
                            })
                            .collect()
                    })
                    .unwrap_or_default(),
                exact: true,
            }
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Configs

/// One `[[campaign]]` of a [`Campaign`] config.
#[derive(Debug, Clone)]
pub struct CampaignSpec {
    /// `name`
    pub name: String,
    /// Contents of its recipients CSV.
    pub recipients: Vec<u8>,
    /// Contents of its template.
    pub template: Vec<u8>,
    /// `sender`
    pub sender: String,
}

/// Builder for a governor config file plus the recipients and templates it names, all in one
/// directory (paths in the config are relative to it). Defaults suit fast tests: high rate,
/// short retry intervals, short restart back-off.
#[derive(Debug, Clone)]
pub struct Campaign {
    /// Directory holding config.toml, the inputs, and var/ (spool, logs).
    pub dir: PathBuf,
    /// `[relay] port`
    pub port: u16,
    /// `target_rate`
    pub target_rate: f64,
    /// `min_workers`
    pub min_workers: u32,
    /// `max_workers`
    pub max_workers: u32,
    /// `sessions`
    pub sessions: u32,
    /// `control_interval`
    pub control_interval: f64,
    /// `[retry] max_attempts`
    pub max_attempts: u32,
    /// `[retry] min_interval`
    pub retry_min_interval: f64,
    /// `[retry] max_interval`
    pub retry_max_interval: f64,
    /// `[supervisor] restart_intensity`
    pub restart_intensity: u32,
    /// `[supervisor] restart_backoff_max`
    pub restart_backoff_max: f64,
    /// The campaigns.
    pub campaigns: Vec<CampaignSpec>,
    /// Extra TOML appended at the top level, before any table (e.g. a bad key).
    pub extra_top: String,
}

impl Campaign {
    /// A config in `dir` relaying to 127.0.0.1:`port`.
    pub fn new(dir: &Path, port: u16) -> Campaign {
        Campaign {
            dir: dir.to_path_buf(),
            port,
            target_rate: 500.0,
            min_workers: 1,
            max_workers: 4,
            sessions: 4,
            control_interval: 0.5,
            max_attempts: 5,
            retry_min_interval: 1.0,
            retry_max_interval: 5.0,
            restart_intensity: 10,
            restart_backoff_max: 1.0,
            campaigns: Vec::new(),
            extra_top: String::new(),
        }
    }

    /// Sets `target_rate`.
    pub fn rate(mut self, r: f64) -> Self {
        self.target_rate = r;
        self
    }

    /// Sets `min_workers` and `max_workers`.
    pub fn workers(mut self, min: u32, max: u32) -> Self {
        self.min_workers = min;
        self.max_workers = max;
        self
    }

    /// Adds a campaign with sender `bounces@example.com`.
    pub fn campaign(
        mut self,
        name: &str,
        recipients: impl Into<Vec<u8>>,
        template: impl Into<Vec<u8>>,
    ) -> Self {
        self.campaigns.push(CampaignSpec {
            name: name.into(),
            recipients: recipients.into(),
            template: template.into(),
            sender: "bounces@example.com".into(),
        });
        self
    }

    /// The config file's path.
    pub fn config_path(&self) -> PathBuf {
        self.dir.join("config.toml")
    }

    /// The spool (default `var/spool.db`).
    pub fn spool(&self) -> PathBuf {
        self.dir.join("var/spool.db")
    }

    /// The log directory (default `var/log`).
    pub fn log_dir(&self) -> PathBuf {
        self.dir.join("var/log")
    }

    /// `var/log/delivery.jsonl`, parsed.
    pub fn delivery_log(&self) -> Vec<Value> {
        read_jsonl(&self.log_dir().join("delivery.jsonl"))
    }

    /// The config text.
    pub fn toml(&self) -> String {
        let mut s = String::new();
        s.push_str("spool = \"var/spool.db\"\nlog_dir = \"var/log\"\n");
        s.push_str(&format!(
            "target_rate = {:?}\nmin_workers = {}\nmax_workers = {}\nsessions = {}\ncontrol_interval = {:?}\n",
            self.target_rate, self.min_workers, self.max_workers, self.sessions, self.control_interval
        ));
        s.push_str(&self.extra_top);
        s.push_str(&format!(
            "\n[supervisor]\nrestart_intensity = {}\nrestart_period = 30.0\nrestart_backoff_max = {:?}\nshutdown_grace = 5.0\n",
            self.restart_intensity, self.restart_backoff_max
        ));
        s.push_str(&format!(
            "\n[relay]\nhost = \"127.0.0.1\"\nport = {}\ntls = \"off\"\nhelo = \"localhost\"\n",
            self.port
        ));
        s.push_str(&format!(
            "\n[retry]\nmax_attempts = {}\nmin_interval = {:?}\nmax_interval = {:?}\nmax_age = 3600.0\n",
            self.max_attempts, self.retry_min_interval, self.retry_max_interval
        ));
        for c in &self.campaigns {
            s.push_str(&format!(
                "\n[[campaign]]\nname = \"{0}\"\nrecipients = \"{0}.csv\"\ntemplate = \"{0}.eml\"\nsender = \"{1}\"\n",
                c.name, c.sender
            ));
        }
        s
    }

    /// Writes config.toml, every campaign's `<name>.csv` and `<name>.eml`; returns the config path.
    pub fn write(&self) -> PathBuf {
        fs::create_dir_all(&self.dir).expect("create campaign dir");
        for c in &self.campaigns {
            fs::write(self.dir.join(format!("{}.csv", c.name)), &c.recipients).unwrap();
            fs::write(self.dir.join(format!("{}.eml", c.name)), &c.template).unwrap();
        }
        self.rewrite_config(&self.toml());
        self.config_path()
    }

    /// Replaces config.toml with `text` (atomically: write and rename, as an operator's editor might).
    pub fn rewrite_config(&self, text: &str) {
        let tmp = self.dir.join(".config.toml.tmp");
        fs::write(&tmp, text).unwrap();
        fs::rename(&tmp, self.config_path()).unwrap();
    }
}

/// A recipients CSV (CRLF rows) with header `email,name` and `n` rows `r<i>@example.com,Name <i>`.
pub fn numbered_recipients(n: usize) -> String {
    let mut s = String::from("email,name\r\n");
    for i in 0..n {
        s.push_str(&format!("r{i:05}@example.com,Name {i}\r\n"));
    }
    s
}

/// A short template with `{{ name }}` and `{{ email }}` merge fields.
pub const SIMPLE_TEMPLATE: &str = "From: News <news@example.com>\nTo: {{ name }} <{{ email }}>\nSubject: Hello {{ name }}\n\nHello {{ name }},\nthis is a test.\n";

// ---------------------------------------------------------------------------------------------
// Running the governor

/// How a governor run ended.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Exit code (`None` when killed by a signal).
    pub code: Option<i32>,
    /// Its stdout.
    pub stdout: String,
    /// Its stderr.
    pub stderr: String,
}

impl Outcome {
    /// The `--json` summary: the last line of stdout, parsed.
    pub fn summary(&self) -> Value {
        let last = self
            .stdout
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("");
        serde_json::from_str(last).unwrap_or_else(|e| {
            panic!("last stdout line is not a JSON summary ({e}): {last:?}\n--- stdout:\n{}\n--- stderr:\n{}", self.stdout, tail(&self.stderr, 4000))
        })
    }

    /// Panics with stdout and stderr unless the exit code is `code`.
    pub fn expect_code(&self, code: i32) -> &Self {
        assert_eq!(
            self.code,
            Some(code),
            "governor exit code\n--- stdout:\n{}\n--- stderr (tail):\n{}",
            self.stdout,
            tail(&self.stderr, 6000)
        );
        self
    }
}

/// The last `n` bytes of `s` (on a char boundary).
pub fn tail(s: &str, n: usize) -> &str {
    if s.len() <= n {
        return s;
    }
    let mut i = s.len() - n;
    while !s.is_char_boundary(i) {
        i += 1;
    }
    &s[i..]
}

/// A running `governor run --json`.
#[derive(Debug)]
pub struct GovernorRun {
    /// The process (killed with its workers on drop).
    pub proc: Proc,
    stdout: PathBuf,
    stderr: PathBuf,
}

/// Starts `governor run --config <config> --json --worker <built worker> <extra...>`; stdout and
/// stderr go to files next to the config. `worker: None` uses the built mta-worker.
pub fn spawn_governor(config: &Path, worker: Option<&Path>, extra: &[&str]) -> GovernorRun {
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::SeqCst);
    let dir = config
        .parent()
        .filter(|d| d.is_dir())
        .map(Path::to_path_buf)
        .unwrap_or_else(std::env::temp_dir);
    let stdout = dir.join(format!("governor-{}-{n}.stdout", std::process::id()));
    let stderr = dir.join(format!("governor-{}-{n}.stderr", std::process::id()));
    let b = bins();
    let mut c = Command::new(&b.governor);
    c.arg("run")
        .arg("--config")
        .arg(config)
        .arg("--json")
        .arg("--worker")
        .arg(worker.unwrap_or(&b.worker))
        .args(extra);
    c.stdin(Stdio::null())
        .stdout(fs::File::create(&stdout).unwrap())
        .stderr(fs::File::create(&stderr).unwrap());
    GovernorRun {
        proc: Proc::spawn("governor", &mut c),
        stdout,
        stderr,
    }
}

impl GovernorRun {
    /// The governor's pid.
    pub fn pid(&self) -> i32 {
        self.proc.pid()
    }

    /// Sends a signal to the governor.
    pub fn signal(&self, sig: Signal) {
        self.proc.signal(sig)
    }

    /// Its worker processes right now (children named mta-worker).
    pub fn workers(&self) -> Vec<i32> {
        children(self.pid())
            .into_iter()
            .filter(|p| comm(*p).is_some_and(|c| c.starts_with("mta-worker")))
            .collect()
    }

    /// Stderr so far.
    pub fn stderr_now(&self) -> String {
        String::from_utf8_lossy(&fs::read(&self.stderr).unwrap_or_default()).into_owned()
    }

    /// Waits for the exit (SIGKILLs it and panics after `timeout`).
    pub fn wait(mut self, timeout: Duration) -> Outcome {
        let status = self.proc.wait_timeout(timeout);
        let read =
            |p: &Path| String::from_utf8_lossy(&fs::read(p).unwrap_or_default()).into_owned();
        if status.is_none() {
            self.proc.kill_all();
            panic!(
                "governor still running after {timeout:?}; killed.\n--- stdout:\n{}\n--- stderr (tail):\n{}",
                read(&self.stdout),
                tail(&read(&self.stderr), 6000)
            );
        }
        Outcome {
            code: status.unwrap().code(),
            stdout: read(&self.stdout),
            stderr: read(&self.stderr),
        }
    }
}

/// Runs `governor run --config <config> --json` to its end (at most `timeout`).
pub fn run_governor(config: &Path, extra: &[&str], timeout: Duration) -> Outcome {
    spawn_governor(config, None, extra).wait(timeout)
}

// ---------------------------------------------------------------------------------------------
// Spool and logs

/// Jobs per state: `SELECT state, count(*) FROM jobs GROUP BY state`.
pub fn spool_states(spool: &Path) -> BTreeMap<String, u64> {
    let db = open_spool(spool);
    let mut st = db
        .prepare("SELECT state, COUNT(*) FROM jobs GROUP BY state")
        .expect("prepare");
    st.query_map([], |r| {
        Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)? as u64))
    })
    .expect("query")
    .map(|r| r.unwrap())
    .collect()
}

/// Jobs that are not final (queued, leased, deferred).
pub fn spool_unfinished(spool: &Path) -> u64 {
    spool_states(spool)
        .iter()
        .filter(|(s, _)| matches!(s.as_str(), "queued" | "leased" | "deferred"))
        .map(|(_, n)| n)
        .sum()
}

/// One job row, as the tests read it.
#[derive(Debug, Clone)]
pub struct JobRow {
    /// Campaign name.
    pub campaign: String,
    /// Recipient as listed.
    pub recipient: String,
    /// State.
    pub state: String,
    /// Last SMTP code.
    pub last_code: Option<i64>,
    /// Last reply text or local reason.
    pub last_text: Option<String>,
    /// Why invalid.
    pub reason: Option<String>,
    /// In-doubt flag.
    pub in_doubt: bool,
    /// The job's Message-ID.
    pub message_id: String,
}

/// Every job.
pub fn spool_jobs(spool: &Path) -> Vec<JobRow> {
    let db = open_spool(spool);
    let mut st = db
        .prepare(
            "SELECT c.name, j.recipient, j.state, j.last_code, j.last_text, j.reason, j.in_doubt, j.message_id
             FROM jobs j JOIN campaigns c ON c.id = j.campaign_id ORDER BY j.id",
        )
        .expect("prepare");
    st.query_map([], |r| {
        Ok(JobRow {
            campaign: r.get(0)?,
            recipient: r.get(1)?,
            state: r.get(2)?,
            last_code: r.get(3)?,
            last_text: r.get(4)?,
            reason: r.get(5)?,
            in_doubt: r.get::<_, i64>(6)? != 0,
            message_id: r.get(7)?,
        })
    })
    .expect("query")
    .map(|r| r.unwrap())
    .collect()
}

fn open_spool(spool: &Path) -> rusqlite::Connection {
    let db =
        rusqlite::Connection::open_with_flags(spool, rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE)
            .unwrap_or_else(|e| panic!("open spool {}: {e}", spool.display()));
    db.busy_timeout(Duration::from_secs(10)).unwrap();
    db
}

/// Every line of a JSON-lines file (missing file: empty). A torn last line (a crash mid-write) is skipped.
pub fn read_jsonl(path: &Path) -> Vec<Value> {
    let text = fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Number of lines in a file (0 if missing).
pub fn count_lines(path: &Path) -> usize {
    let mut s = Vec::new();
    if let Ok(mut f) = fs::File::open(path) {
        let _ = f.read_to_end(&mut s);
    }
    s.iter().filter(|&&b| b == b'\n').count()
}

// ---------------------------------------------------------------------------------------------
// Messages

/// Parses messages with Python's `email` package (`peers/mailparse.py`): one JSON object per
/// message, see that script. `scratch` is a directory for the temporary files.
pub fn parse_mail(scratch: &Path, msgs: &[&[u8]]) -> Vec<Value> {
    if msgs.is_empty() {
        return Vec::new();
    }
    fs::create_dir_all(scratch).unwrap();
    let files: Vec<PathBuf> = msgs
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let p = scratch.join(format!("parse-{i}.eml"));
            fs::write(&p, m).unwrap();
            p
        })
        .collect();
    let out = Command::new(python())
        .arg(peers_dir().join("mailparse.py"))
        .args(&files)
        .output()
        .expect("run mailparse.py");
    assert!(
        out.status.success(),
        "mailparse.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Vec<Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(v.len(), msgs.len());
    v
}

/// The header section of a message (up to, not including, the first empty line; LF or CRLF).
pub fn header_section(msg: &[u8]) -> &[u8] {
    let mut pos = 0;
    while pos < msg.len() {
        let end = msg[pos..]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(msg.len(), |i| pos + i + 1);
        let line = &msg[pos..end];
        if line == b"\n" || line == b"\r\n" {
            return &msg[..pos];
        }
        pos = end;
    }
    msg
}

/// Header field names in order (continuation lines skipped).
pub fn header_names(msg: &[u8]) -> Vec<String> {
    header_section(msg)
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty() && l[0] != b' ' && l[0] != b'\t' && l != b"\r")
        .map(|l| {
            let name = l.split(|&b| b == b':').next().unwrap_or(l);
            String::from_utf8_lossy(name).into_owned()
        })
        .collect()
}

/// Removes every header field named `name` (case-insensitive), with its continuation lines.
pub fn remove_header(msg: &[u8], name: &str) -> (Vec<u8>, usize) {
    let hdr_len = header_section(msg).len();
    let mut out = Vec::with_capacity(msg.len());
    let mut removed = 0;
    let mut skipping = false;
    let mut pos = 0;
    while pos < hdr_len {
        let end = msg[pos..hdr_len]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(hdr_len, |i| pos + i + 1);
        let line = &msg[pos..end];
        let cont = line.first().is_some_and(|&b| b == b' ' || b == b'\t');
        if !cont {
            skipping = line.len() > name.len()
                && line[..name.len()].eq_ignore_ascii_case(name.as_bytes())
                && line[name.len()] == b':';
            if skipping {
                removed += 1;
            }
        }
        if !skipping {
            out.extend_from_slice(line);
        }
        pos = end;
    }
    out.extend_from_slice(&msg[hdr_len..]);
    (out, removed)
}

/// Normalises line ends to CRLF (CRLF kept, lone LF and lone CR become CRLF) and makes the
/// message end with CRLF.
pub fn to_crlf(b: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(b.len() + b.len() / 20);
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'\r' if b.get(i + 1) == Some(&b'\n') => {
                out.extend_from_slice(b"\r\n");
                i += 2;
                continue;
            }
            b'\r' | b'\n' => out.extend_from_slice(b"\r\n"),
            c => out.push(c),
        }
        i += 1;
    }
    if !out.is_empty() && !out.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// Line-level faults of a stored message: bare CR or LF (exact stores only), lines over 998
/// octets, missing final line end. Empty when clean.
pub fn line_faults(data: &[u8], exact: bool) -> Vec<String> {
    let mut faults = Vec::new();
    let mut line_no = 0;
    let mut start = 0;
    let mut i = 0;
    while i < data.len() {
        let c = data[i];
        if c == b'\n' || (c == b'\r' && exact) {
            line_no += 1;
            let crlf = c == b'\r' && data.get(i + 1) == Some(&b'\n');
            if exact && !crlf {
                faults.push(format!(
                    "line {line_no}: bare {}",
                    if c == b'\r' { "CR" } else { "LF" }
                ));
            }
            let len = i - start;
            if len > 998 {
                faults.push(format!("line {line_no}: {len} octets (> 998)"));
            }
            i += if crlf { 2 } else { 1 };
            start = i;
            continue;
        }
        i += 1;
    }
    if start < data.len() {
        faults.push("no line end after the last line".into());
    }
    faults
}

/// `{{ field }}` substitution as the tests expect it for plain templates (no other syntax).
pub fn render(template: &str, fields: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = template;
    while let Some(i) = rest.find("{{") {
        out.push_str(&rest[..i]);
        let j = rest[i..].find("}}").expect("unclosed {{") + i;
        let key = rest[i + 2..j].trim();
        out.push_str(fields.get(key).unwrap_or_else(|| panic!("no field {key}")));
        rest = &rest[j + 2..];
    }
    out.push_str(rest);
    out
}

/// RFC 4180 CSV: quoted fields may hold commas, `""` and line breaks; records end at CRLF or LF.
pub fn parse_csv(text: &str) -> Vec<Vec<String>> {
    let mut records = Vec::new();
    let mut rec = Vec::new();
    let mut field = String::new();
    let mut chars = text.chars().peekable();
    let mut in_quotes = false;
    let mut any = false;
    while let Some(c) = chars.next() {
        any = true;
        if in_quotes {
            match c {
                '"' if chars.peek() == Some(&'"') => {
                    chars.next();
                    field.push('"');
                }
                '"' => in_quotes = false,
                _ => field.push(c),
            }
            continue;
        }
        match c {
            '"' => in_quotes = true,
            ',' => rec.push(std::mem::take(&mut field)),
            '\r' if chars.peek() == Some(&'\n') => {}
            '\n' => {
                rec.push(std::mem::take(&mut field));
                records.push(std::mem::take(&mut rec));
                any = false;
            }
            _ => field.push(c),
        }
    }
    if any {
        rec.push(field);
        records.push(rec);
    }
    records
}

/// IDNA ToASCII for a domain as mail software does it: every non-ASCII label becomes
/// `xn--` + Punycode of its lower-cased form (RFC 3492); ASCII labels are kept.
pub fn domain_to_ascii(domain: &str) -> String {
    domain
        .split('.')
        .map(|label| {
            if label.is_ascii() {
                label.to_string()
            } else {
                format!("xn--{}", punycode(&label.to_lowercase()))
            }
        })
        .collect::<Vec<_>>()
        .join(".")
}

fn punycode(input: &str) -> String {
    const BASE: u32 = 36;
    const TMIN: u32 = 1;
    const TMAX: u32 = 26;
    fn adapt(mut delta: u32, numpoints: u32, first: bool) -> u32 {
        delta /= if first { 700 } else { 2 };
        delta += delta / numpoints;
        let mut k = 0;
        while delta > ((BASE - TMIN) * TMAX) / 2 {
            delta /= BASE - TMIN;
            k += BASE;
        }
        k + (BASE - TMIN + 1) * delta / (delta + 38)
    }
    let digit = |d: u32| -> char {
        if d < 26 {
            (b'a' + d as u8) as char
        } else {
            (b'0' + (d - 26) as u8) as char
        }
    };
    let cps: Vec<u32> = input.chars().map(|c| c as u32).collect();
    let mut out: String = input.chars().filter(char::is_ascii).collect();
    let b = out.len() as u32;
    let mut h = b;
    if b > 0 {
        out.push('-');
    }
    let (mut n, mut delta, mut bias) = (128u32, 0u32, 72u32);
    while (h as usize) < cps.len() {
        let m = *cps.iter().filter(|&&c| c >= n).min().unwrap();
        delta += (m - n) * (h + 1);
        n = m;
        for &c in &cps {
            if c < n {
                delta += 1;
            }
            if c == n {
                let mut q = delta;
                let mut k = BASE;
                loop {
                    let t = if k <= bias {
                        TMIN
                    } else if k >= bias + TMAX {
                        TMAX
                    } else {
                        k - bias
                    };
                    if q < t {
                        break;
                    }
                    out.push(digit(t + (q - t) % (BASE - t)));
                    q = (q - t) / (BASE - t);
                    k += BASE;
                }
                out.push(digit(q));
                bias = adapt(delta, h + 1, h == b);
                delta = 0;
                h += 1;
            }
        }
        delta += 1;
        n += 1;
    }
    out
}

/// The envelope form of a listed address: domain as A-label (`user@bücher.example` ->
/// `user@xn--bcher-kva.example`), local part unchanged.
pub fn envelope_form(addr: &str) -> String {
    match addr.rsplit_once('@') {
        Some((local, domain)) => format!("{local}@{}", domain_to_ascii(domain)),
        None => addr.to_string(),
    }
}

/// Address equality as SMTP treats it: local part exact, domain case-insensitive (A-label form).
pub fn same_mailbox(a: &str, b: &str) -> bool {
    match (a.rsplit_once('@'), b.rsplit_once('@')) {
        (Some((la, da)), Some((lb, db))) => {
            la == lb && domain_to_ascii(da).eq_ignore_ascii_case(&domain_to_ascii(db))
        }
        _ => a == b,
    }
}

/// Reads from a connected stream until `needle` appears or `timeout` passes.
pub fn read_until(s: &mut TcpStream, needle: &str, timeout: Duration) -> String {
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let end = Instant::now() + timeout;
    let mut buf = Vec::new();
    while Instant::now() < end && !String::from_utf8_lossy(&buf).contains(needle) {
        let mut b = [0u8; 4096];
        match s.read(&mut b) {
            Ok(0) => break,
            Ok(n) => buf.extend_from_slice(&b[..n]),
            Err(_) => {}
        }
    }
    let _ = s.write_all(b"QUIT\r\n");
    String::from_utf8_lossy(&buf).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn punycode_matches_rfc_examples() {
        assert_eq!(domain_to_ascii("bücher.example"), "xn--bcher-kva.example");
        assert_eq!(domain_to_ascii("münchen.de"), "xn--mnchen-3ya.de");
        assert_eq!(domain_to_ascii("例え.テスト"), "xn--r8jz45g.xn--zckzah");
        assert_eq!(domain_to_ascii("example.com"), "example.com");
    }

    #[test]
    fn csv_handles_quotes_and_line_breaks() {
        let r = parse_csv("a,b\r\n\"x, \"\"y\"\"\",\"1\r\n2\"\r\nlast,\r\n");
        assert_eq!(
            r,
            vec![vec!["a", "b"], vec!["x, \"y\"", "1\r\n2"], vec!["last", ""]]
        );
    }

    #[test]
    fn crlf_normalisation_is_idempotent() {
        assert_eq!(to_crlf(b"a\nb\r\nc\rd"), b"a\r\nb\r\nc\r\nd\r\n");
        assert_eq!(to_crlf(&to_crlf(b"a\nb")), to_crlf(b"a\nb"));
    }

    #[test]
    fn line_faults_find_bare_ends_and_long_lines() {
        assert!(line_faults(b"a\r\nb\r\n", true).is_empty());
        assert_eq!(line_faults(b"a\nb\r\n", true), vec!["line 1: bare LF"]);
        let long = format!("{}\r\n", "x".repeat(999));
        assert_eq!(
            line_faults(long.as_bytes(), true),
            vec!["line 1: 999 octets (> 998)"]
        );
    }

    #[test]
    fn smtp_sink_dump_is_split_into_trace_and_message() {
        let raw = b"X-Client-Addr: 127.0.0.1\nX-Client-Proto: ESMTP\nX-Helo-Args: vm\nX-Mail-Args: <x@y.z> BODY=8BITMIME\nX-Rcpt-Args: <\"odd user\"@example.com>\nReceived: from vm ([127.0.0.1])\n\tby smtp-sink (smtp-sink) with ESMTP id 1;\n\tThu,  3 Dec 2026 17:10:38 +0000 (UTC)\nSubject: t\n\n.dot\n\n";
        let s = parse_smtp_sink_dump(Path::new("x"), raw);
        assert_eq!(s.mail_from, "x@y.z");
        assert_eq!(s.mail_params, vec!["BODY=8BITMIME"]);
        assert_eq!(s.rcpt, vec!["\"odd user\"@example.com"]);
        assert_eq!(s.data, b"Subject: t\n\n.dot\n");
    }

    #[test]
    fn header_removal_takes_continuations() {
        let (m, n) = remove_header(
            b"A: 1\r\nMessage-ID:\r\n <x@y>\r\nB: 2\r\n\r\nMessage-ID: body\r\n",
            "message-id",
        );
        assert_eq!(n, 1);
        assert_eq!(m, b"A: 1\r\nB: 2\r\n\r\nMessage-ID: body\r\n");
    }
}
