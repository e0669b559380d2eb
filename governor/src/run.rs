//! The main loop: start-up checks, then measure, decide, dispatch and supervise until every job
//! has a final state (or a signal stops the run).
//!
//! # Theory of operation
//! One thread owns all state (spool, worker table, pacer, controller). Everything else - each
//! worker's reader thread and the signal thread - only sends [`Event`]s to it over a channel, so
//! there are no locks around job state. Each turn of the loop:
//! 1. waits for an event, but no longer than until the next token, flush or tick is due;
//! 2. handles every event waiting (outcomes, handshakes, closed sockets, signals);
//! 3. reaps exited workers and returns their jobs to the front of the queue, flagged in doubt;
//! 4. dispatches as many jobs as the pacer allows to the least-loaded ready workers;
//! 5. flushes finished attempts (delivery log, then one spool transaction) every 100 ms;
//! 6. on each control tick, measures the window, decides the worker count and applies it.
//!
//! Crash bound: a job is marked `leased` in the spool before it is handed to a worker, and its
//! outcome is committed at most [`FLUSH_EVERY`] later. A kill -9 of the governor therefore
//! replays at most the jobs leased at that moment (the prefetch batch plus
//! `max_workers x sessions` in flight): they come back `queued`, flagged in doubt, and are sent
//! again. Nothing committed is lost.

use std::collections::{HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use log::{error, info, warn};
use protocol::{CampaignSpec, JobOutcome, OutcomeKind, ToGovernor, ToWorker, Welcome};
use serde::Serialize;

use crate::campaign::{self, Recipients};
use crate::config::Config;
use crate::control::{self, Meter};
use crate::deliverylog::{Attempt, DeliveryLog};
use crate::dispatch::Pacer;
use crate::signals::{self, Sig};
use crate::spool::{Final, LeasedJob, Record, Spool, Update};
use crate::supervisor::restart::{RestartPolicy, Verdict};
use crate::supervisor::{Exited, InFlight, Supervisor, WorkerEvent, WorkerState};

/// Finished attempts are committed to the spool at least this often.
pub const FLUSH_EVERY: Duration = Duration::from_millis(100);
/// A worker that has not said Hello within this time is killed.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The longest a job may legitimately stay with a worker: every per-stage SMTP deadline of one
/// attempt added up, plus a margin for rendering and a reconnect.
pub fn job_deadline(t: &protocol::Timeouts) -> Duration {
    let ms = [
        t.connect_ms,
        t.greeting_ms,
        t.ehlo_ms,
        t.mail_ms,
        t.rcpt_ms,
        t.data_ms,
        t.final_dot_ms,
    ]
    .iter()
    .map(|&m| u64::from(m))
    .sum::<u64>();
    // A reused connection found dead is retried once on a fresh one: allow two connects.
    Duration::from_millis(ms + u64::from(t.connect_ms) + u64::from(t.greeting_ms))
        + Duration::from_secs(5)
}

/// How the binary wants the run done.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Path of the `mta-worker` executable.
    pub worker: PathBuf,
    /// Print a progress line to stderr every second.
    pub progress: bool,
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Every job has a final state.
    Complete,
    /// Stopped by SIGTERM/SIGINT; run the same command again to resume.
    Interrupted,
    /// Workers kept failing (restart intensity exceeded); jobs are still queued.
    WorkersFailing,
}

impl Status {
    /// The process exit code for this status.
    pub fn exit_code(self) -> i32 {
        match self {
            Status::Complete => 0,
            Status::Interrupted => 3,
            Status::WorkersFailing => 4,
        }
    }
}

/// The summary printed at the end (and as JSON with `--json`).
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// How the run ended.
    pub status: Status,
    /// Jobs in the spool (all campaigns, invalid rows included).
    pub total: u64,
    /// Jobs delivered (2xx after the final dot).
    pub delivered: u64,
    /// Deferred attempts during this run (temporary failures; the jobs were retried).
    pub deferred: u64,
    /// Jobs bounced (permanent failure).
    pub bounced: u64,
    /// Jobs that ran out of attempts or age after temporary failures.
    pub expired: u64,
    /// Rows rejected at ingestion (bad address, bad UTF-8, wrong column count, duplicate).
    pub invalid: u64,
    /// Jobs flagged in doubt (possibly delivered twice: in flight at a crash, or the answer
    /// after the final dot was lost).
    pub in_doubt: u64,
    /// Jobs without a final state (non-zero only when not complete).
    pub pending: u64,
    /// Delivery attempts made during this run.
    pub attempts: u64,
    /// Wall time of this run, seconds.
    pub duration_s: f64,
    /// Attempts per second over this run.
    pub rate: f64,
    /// Largest number of allocated workers at any time.
    pub max_workers: usize,
    /// Unexpected worker exits that were restarted.
    pub restarts: u64,
    /// Jobs returned to the queue at start-up (in flight at the previous run's end).
    pub recovered: u64,
}

/// A run that could not start or had to stop on an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Bad configuration, input or environment: nothing was sent. Exit code 2.
    #[error("{0}")]
    Setup(String),
    /// A failure while running (spool I/O and the like). Exit code 1.
    #[error("{0}")]
    Runtime(String),
}

impl RunError {
    /// The process exit code.
    pub fn exit_code(&self) -> i32 {
        match self {
            RunError::Setup(_) => 2,
            RunError::Runtime(_) => 1,
        }
    }
}

/// Everything the main loop is woken by.
#[derive(Debug)]
pub enum Event {
    /// A worker (by incarnation) sent a frame or closed.
    Worker(u64, WorkerEvent),
    /// A signal arrived.
    Signal(Sig),
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// A tiny xorshift generator for retry jitter (no cryptographic use).
struct Jitter(u64);

impl Jitter {
    fn new() -> Self {
        let seed = unix_now().to_bits() ^ ((std::process::id() as u64) << 32) | 1;
        Jitter(seed)
    }
    /// Uniform in [0, 1).
    fn next(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Validates the configured campaigns, ingests their recipients into the spool and returns the
/// worker-facing specs by campaign id. Errors here are set-up errors: nothing has been sent.
fn prepare_campaigns(
    cfg: &Config,
    spool: &mut Spool,
) -> Result<HashMap<u64, CampaignSpec>, RunError> {
    let mut specs = HashMap::new();
    for (i, c) in cfg.campaigns.iter().enumerate() {
        let template = read_template(&c.template, cfg.limits.template_max_bytes).map_err(|e| {
            RunError::Setup(format!(
                "campaign `{}` (campaign[{i}].template): {e}",
                c.name
            ))
        })?;
        let recipients = Recipients::open(&c.recipients, cfg.limits.field_max_bytes)
            .map_err(|e| RunError::Setup(format!("campaign `{}`: {e}", c.name)))?;
        let fields = recipients.fields().to_vec();
        mta_worker::render::check_template(&template, &fields).map_err(|e| {
            RunError::Setup(format!(
                "campaign `{}`: template {}: {e} (fields available from {}: {})",
                c.name,
                c.template.display(),
                c.recipients.display(),
                fields.join(", ")
            ))
        })?;
        let row = spool
            .campaign(&c.name, &template, &c.sender, &fields)
            .map_err(|e| RunError::Setup(format!("campaign `{}`: {e}", c.name)))?;
        if !row.ingest_done {
            let t = Instant::now();
            let stats = campaign::ingest_all(spool, &row, recipients, 1000)
                .map_err(|e| RunError::Setup(format!("campaign `{}`: {e}", c.name)))?;
            info!(
                "campaign={} ingested {} rows in {:.1}s: {} queued, {} invalid (of which {} duplicates){}",
                c.name,
                stats.rows,
                t.elapsed().as_secs_f64(),
                stats.queued,
                stats.invalid,
                stats.duplicates,
                if row.rows_ingested > 0 {
                    format!(", resumed after row {}", row.rows_ingested)
                } else {
                    String::new()
                }
            );
        }
        for (line, raw, reason) in spool
            .invalid_rows(row.id)
            .map_err(|e| RunError::Runtime(e.to_string()))?
            .iter()
            .take(50)
        {
            warn!(
                "campaign={} line={line} invalid row {raw:?}: {reason}",
                c.name
            );
        }
        specs.insert(
            row.id,
            CampaignSpec {
                campaign_id: row.id,
                name: c.name.clone(),
                template,
                sender: c.sender.clone(),
                fields,
            },
        );
    }
    Ok(specs)
}

fn read_template(path: &Path, max: usize) -> Result<String, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if meta.len() > max as u64 {
        return Err(format!(
            "{} is {} bytes, over the limit of {max} (raise limits.template_max_bytes)",
            path.display(),
            meta.len()
        ));
    }
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    String::from_utf8(bytes).map_err(|e| {
        format!(
            "{}: not valid UTF-8 at byte {}",
            path.display(),
            e.utf8_error().valid_up_to()
        )
    })
}

/// The loop's state.
struct Governor {
    cfg: Config,
    opts: RunOptions,
    spool: Spool,
    specs: HashMap<u64, CampaignSpec>,
    sup: Supervisor,
    tx: Sender<Event>,
    rx: Receiver<Event>,
    dlog: DeliveryLog,
    clog: BufWriter<File>,
    pacer: Pacer,
    meter: Meter,
    ctl: control::State,
    restart: RestartPolicy,
    jitter: Jitter,
    retry: crate::retry::Tracker,
    ready: VecDeque<LeasedJob>,
    pending: Vec<Record>,
    desired: usize,
    respawn_at: Instant,
    next_lease: Instant,
    next_flush: Instant,
    next_tick: Instant,
    next_progress: Instant,
    tick: u64,
    started: Instant,
    /// Wall-clock start of the run, for schedule offsets and deadlines.
    started_unix: f64,
    /// When the controller last decided (continuous mode rate-limits on it).
    last_decision: Instant,
    /// The last decision asked to shed by killing busy workers rather than draining them.
    kill_shed: bool,
    /// A worker may have exited: reap at the next turn of the loop.
    reap_due: bool,
    next_reap: Instant,
    stopping: Option<Instant>,
    escalated: Option<String>,
    backlog_seen: bool,
    spool_error: Option<String>,
    // counters for the summary and progress
    attempts: u64,
    deferred: u64,
    restarts: u64,
    recovered: u64,
    peak_workers: usize,
    finals: u64,
    total: u64,
}

/// Takes an exclusive lock on `<spool>.lock` (flock, released by the kernel when the process
/// dies, so a crash never leaves a stale lock) and writes our pid into it. A second governor on
/// the same spool is refused before it touches a job.
fn lock_spool(spool: &Path) -> Result<nix::fcntl::Flock<File>, RunError> {
    use nix::fcntl::{Flock, FlockArg};
    use std::io::{Read, Seek};
    let mut name = spool.as_os_str().to_owned();
    name.push(".lock");
    let path = PathBuf::from(name);
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .map_err(|e| RunError::Setup(format!("spool directory {}: {e}", dir.display())))?;
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| RunError::Setup(format!("spool lock {}: {e}", path.display())))?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(mut lock) => {
            let _ = lock.set_len(0);
            let _ = lock.rewind();
            let _ = write!(*lock, "{}", std::process::id());
            Ok(lock)
        }
        Err((mut file, _)) => {
            let mut pid = String::new();
            let _ = file.read_to_string(&mut pid);
            Err(RunError::Setup(format!(
                "spool {} is in use by another governor (pid {}): two governors must never send the same queue; stop it first or give this config its own `spool`",
                spool.display(),
                pid.trim()
            )))
        }
    }
}

/// Runs the configured campaigns to completion.
pub fn run(cfg: Config, opts: RunOptions) -> Result<Summary, RunError> {
    Supervisor::check_worker(&opts.worker).map_err(RunError::Setup)?;
    std::fs::create_dir_all(&cfg.log_dir)
        .map_err(|e| RunError::Setup(format!("log_dir {}: {e}", cfg.log_dir.display())))?;
    // Held for the whole run: a second governor on the same spool would send the same queue.
    let _lock = lock_spool(&cfg.spool)?;
    let mut spool = Spool::open(&cfg.spool).map_err(|e| RunError::Setup(e.to_string()))?;
    let recovered = spool
        .recover()
        .map_err(|e| RunError::Runtime(e.to_string()))?;
    if recovered > 0 {
        warn!(
            "{recovered} jobs were leased when the previous run ended: requeued and flagged in doubt"
        );
    }
    let specs = prepare_campaigns(&cfg, &mut spool)?;
    let dlog = DeliveryLog::open(&cfg.log_dir.join("delivery.jsonl"))
        .map_err(|e| RunError::Setup(format!("delivery log in {}: {e}", cfg.log_dir.display())))?;
    let clog = OpenOptions::new()
        .create(true)
        .append(true)
        .open(cfg.log_dir.join("control.jsonl"))
        .map_err(|e| RunError::Setup(format!("control log in {}: {e}", cfg.log_dir.display())))?;
    let counts = spool
        .counts(None)
        .map_err(|e| RunError::Runtime(e.to_string()))?;
    let (tx, rx) = crossbeam_channel::unbounded();
    let _signals = signals::forward(tx.clone(), Event::Signal)
        .map_err(|e| RunError::Setup(format!("cannot install signal handlers: {e}")))?;
    let now = Instant::now();
    let mut g = Governor {
        pacer: Pacer::new(cfg.target.rate(unix_now(), unix_now(), counts.total).0, now),
        meter: Meter::new(now, 0, cfg.sessions as usize),
        restart: RestartPolicy::new(
            cfg.supervisor.restart_intensity,
            cfg.supervisor.restart_period,
            cfg.supervisor.restart_backoff_max,
        ),
        sup: Supervisor::new(opts.worker.clone(), cfg.log_dir.clone()),
        desired: cfg.min_workers as usize,
        retry: crate::retry::Tracker::new(cfg.retry.policy()),
        cfg,
        opts,
        spool,
        specs,
        tx,
        rx,
        dlog,
        clog: BufWriter::new(clog),
        ctl: control::State::default(),
        jitter: Jitter::new(),
        ready: VecDeque::new(),
        pending: Vec::new(),
        respawn_at: now,
        next_lease: now,
        next_flush: now + FLUSH_EVERY,
        next_tick: now,
        next_progress: now + Duration::from_secs(1),
        tick: 0,
        started: now,
        started_unix: unix_now(),
        last_decision: now,
        kill_shed: false,
        reap_due: false,
        next_reap: now,
        stopping: None,
        escalated: None,
        backlog_seen: false,
        spool_error: None,
        attempts: 0,
        deferred: 0,
        restarts: 0,
        recovered,
        peak_workers: 0,
        finals: counts.delivered + counts.bounced + counts.expired + counts.invalid,
        total: counts.total,
    };
    g.next_tick = now + g.cfg.control_interval;
    let user = worker_credentials(&g.cfg);
    g.sup.run_as(user);
    info!(
        "governor starting: {} jobs ({} already final), target_rate={}/s workers={}..{} sessions={} worker={}",
        g.total,
        g.finals,
        g.cfg.target_rate,
        g.cfg.min_workers,
        g.cfg.max_workers,
        g.cfg.sessions,
        g.opts.worker.display()
    );
    let status = g.main_loop()?;
    g.finish(status)
}

/// Whom workers run as: `supervisor.worker_user` when the governor is root (a non-root governor
/// cannot switch users, and its workers already run unprivileged, as itself).
fn worker_credentials(cfg: &Config) -> Option<crate::supervisor::spawn::Credentials> {
    let root = nix::unistd::geteuid().is_root();
    match (&cfg.supervisor.worker_user, root) {
        (Some(u), true) => {
            info!(
                "workers run as user {} (uid={} gid={})",
                u.name, u.uid, u.gid
            );
            Some(crate::supervisor::spawn::Credentials {
                uid: u.uid,
                gid: u.gid,
            })
        }
        (Some(u), false) => {
            info!(
                "supervisor.worker_user = {:?} ignored: the governor is not root, so workers run as its own user",
                u.name
            );
            None
        }
        (None, true) => {
            warn!(
                "the governor runs as root and supervisor.worker_user is not set: workers run as root too"
            );
            None
        }
        (None, false) => None,
    }
}

impl Governor {
    fn main_loop(&mut self) -> Result<Status, RunError> {
        loop {
            let now = Instant::now();
            let wait = self.next_wake(now);
            match self.rx.recv_timeout(wait) {
                Ok(ev) => self.handle(ev)?,
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => unreachable!("the loop holds a sender"),
            }
            while let Ok(ev) = self.rx.try_recv() {
                self.handle(ev)?;
            }
            // try_wait on every worker is a syscall each: reap on SIGCHLD (or a closed socket),
            // and poll every 250 ms in case a signal was coalesced.
            if self.reap_due || Instant::now() >= self.next_reap {
                self.reap_due = false;
                self.next_reap = Instant::now() + Duration::from_millis(250);
                self.reap();
            }
            if let Some(why) = &self.escalated {
                error!("{why}");
                return Ok(Status::WorkersFailing);
            }
            let now = Instant::now();
            if let Some(deadline) = self.stopping {
                let inflight: usize = self.sup.workers().iter().map(|w| w.inflight.len()).sum();
                if inflight == 0 || now >= deadline {
                    if inflight > 0 {
                        warn!(
                            "shutdown grace period over: {inflight} jobs still in flight stay leased and are flagged in doubt at the next start"
                        );
                    }
                    return Ok(Status::Interrupted);
                }
            } else {
                self.scale(now);
                self.dispatch(now)?;
                // N(t) and the busy sessions are integrated at every change, not sampled at
                // ticks: the efficiency and utilization are time-averages (claims 4, 5).
                let (ready, busy) = (self.sup.count(WorkerState::Ready), self.busy_sessions());
                self.meter.level(now, ready, busy);
            }
            if now >= self.next_flush {
                self.flush()?;
            }
            let continuous_due = self.cfg.control == crate::config::ControlMode::Continuous
                && self.meter.attempts() > 0
                && now.duration_since(self.last_decision) >= crate::config::CONTINUOUS_MIN_GAP;
            if now >= self.next_tick || continuous_due {
                self.control_tick(now);
            }
            if self.opts.progress && now >= self.next_progress {
                self.progress(now);
            }
            if self.stopping.is_none() && self.is_complete()? {
                return Ok(Status::Complete);
            }
        }
    }

    fn next_wake(&mut self, now: Instant) -> Duration {
        let mut t = self.next_tick.min(self.next_flush);
        if self.stopping.is_none() && !self.ready.is_empty() && self.free_sessions() > 0 {
            t = t.min(now + self.pacer.next_in());
        }
        if self.ready.is_empty() {
            t = t.min(self.next_lease);
        }
        if self.sup.count(WorkerState::Ready) + self.sup.count(WorkerState::Starting) < self.desired
        {
            t = t.min(self.respawn_at);
        }
        // Reaping is driven by SIGCHLD; poll now and then in case a signal was coalesced.
        t = t.min(now + Duration::from_millis(250));
        t.saturating_duration_since(now)
            .max(Duration::from_millis(2))
    }

    fn free_sessions(&self) -> usize {
        let s = self.cfg.sessions as usize;
        self.sup
            .workers()
            .iter()
            .filter(|w| w.state == WorkerState::Ready && !w.aborted)
            .map(|w| s.saturating_sub(w.inflight.len()))
            .sum()
    }

    fn handle(&mut self, ev: Event) -> Result<(), RunError> {
        match ev {
            Event::Signal(Sig::Child) => self.reap_due = true,
            Event::Signal(Sig::Reload) => self.reload(),
            Event::Signal(Sig::Stop) => {
                if self.stopping.is_some() {
                    warn!(
                        "second stop signal: stopping at once; jobs in flight are flagged in doubt at the next start"
                    );
                    self.sup.stop_all(Duration::ZERO);
                    self.stopping = Some(Instant::now());
                    return Ok(());
                }
                let grace = self.cfg.supervisor.shutdown_grace;
                info!(
                    "stop requested: no new jobs; waiting up to {:.1}s for jobs in flight",
                    grace.as_secs_f64()
                );
                self.stopping = Some(Instant::now() + grace);
                self.release_ready();
            }
            Event::Worker(inc, WorkerEvent::Frame(msg)) => self.on_frame(inc, msg),
            Event::Worker(inc, WorkerEvent::Closed(why)) => {
                self.reap_due = true;
                if let Some(w) = self.sup.get(inc) {
                    let (slot, pid, state) = (w.slot, w.pid, w.state);
                    if state == WorkerState::Ready || state == WorkerState::Starting {
                        warn!("worker={slot} pid={pid} connection lost ({why}): killing it");
                    }
                    if state != WorkerState::Draining || why != "socket closed" {
                        self.sup.abort(inc);
                    }
                }
            }
        }
        Ok(())
    }

    fn on_frame(&mut self, inc: u64, msg: ToGovernor) {
        let Some(w) = self.sup.get(inc) else { return };
        let (slot, pid) = (w.slot, w.pid);
        match msg {
            ToGovernor::Hello { version, pid: wpid } => {
                if version != protocol::PROTOCOL_VERSION {
                    let reason = format!(
                        "worker {} speaks protocol {version}, this governor speaks {}: rebuild both from the same source",
                        self.opts.worker.display(),
                        protocol::PROTOCOL_VERSION
                    );
                    let _ = self.sup.send(
                        inc,
                        &ToWorker::Reject {
                            reason: reason.clone(),
                        },
                    );
                    self.sup.kill(inc);
                    self.escalated = Some(reason);
                    return;
                }
                let welcome = ToWorker::Welcome(Welcome {
                    slot,
                    log_path: self.sup.log_path(slot).display().to_string(),
                    sessions: self.cfg.sessions,
                    relay: self.cfg.relay.clone(),
                    timeouts: self.cfg.timeouts.clone(),
                    dkim: self.cfg.dkim.clone(),
                });
                if let Err(e) = self.sup.send(inc, &welcome) {
                    warn!("worker={slot} pid={pid} cannot send welcome: {e}");
                    self.sup.abort(inc);
                    return;
                }
                if let Some(w) = self.sup.get_mut(inc) {
                    w.state = WorkerState::Ready;
                }
                info!("worker={slot} pid={wpid} ready");
            }
            ToGovernor::Outcome(o) => self.on_outcome(inc, o),
            ToGovernor::Fatal { reason } => {
                error!("worker={slot} pid={pid} reports a fatal error: {reason}");
            }
        }
    }

    fn on_outcome(&mut self, inc: u64, o: JobOutcome) {
        let now_unix = unix_now();
        let Some(w) = self.sup.get_mut(inc) else {
            return;
        };
        let (slot, pid) = (w.slot, w.pid);
        let job = match w.inflight.get(&o.job_id) {
            Some(f) if f.job.lease_id == o.lease_id => {
                w.inflight.remove(&o.job_id).expect("present").job
            }
            _ => {
                warn!(
                    "worker={slot} pid={pid} sent an outcome for job {} lease {} that was not leased to it: ignored",
                    o.job_id, o.lease_id
                );
                return;
            }
        };
        w.completed += 1;
        if o.kind == OutcomeKind::Delivered {
            w.delivered += 1;
        }
        self.restart.healthy();
        self.meter
            .record(slot, o.kind, o.code, o.stage, o.latency_ms);
        self.pacer.completed(1, Instant::now());
        self.attempts += 1;
        let retry = &self.cfg.retry;
        let age = job.first_attempt_at.map(|t| now_unix - t).unwrap_or(0.0);
        let (update, label) = match o.kind {
            OutcomeKind::Delivered => (Update::Final(Final::Delivered), "delivered"),
            OutcomeKind::Bounced => (Update::Final(Final::Bounced), "bounced"),
            OutcomeKind::Deferred | OutcomeKind::InDoubt => {
                let label = if o.kind == OutcomeKind::InDoubt {
                    "in_doubt"
                } else {
                    "deferred"
                };
                // The adaptive limit (retry.rs): the last tick's pool value, with this job's stage.
                let limit = self.retry.for_job(job.campaign_id, job.attempt, age);
                if limit.expires(job.attempt) || age >= retry.max_age.as_secs_f64() {
                    log::debug!(
                        "job={} attempt={} expired: limit={} ({}) age={age:.0}s",
                        job.job_id,
                        job.attempt,
                        limit.value,
                        limit.reason()
                    );
                    (Update::Final(Final::Expired), "expired")
                } else {
                    // Counted only when the job is retried: an attempt that expires a job is
                    // counted under `expired`.
                    self.deferred += 1;
                    let d = crate::retry::delay(retry, job.attempt, self.jitter.next());
                    (
                        Update::Deferred {
                            next_attempt_at: now_unix + d.as_secs_f64(),
                        },
                        label,
                    )
                }
            }
        };
        if matches!(update, Update::Final(_)) {
            self.finals += 1;
        }
        let in_doubt = job.in_doubt || o.kind == OutcomeKind::InDoubt;
        let campaign = self
            .specs
            .get(&job.campaign_id)
            .map(|c| c.name.as_str())
            .unwrap_or("?");
        let line = Attempt {
            time: now_unix,
            campaign,
            job: job.job_id,
            recipient: &job.recipient,
            worker: slot,
            pid,
            attempt: job.attempt,
            outcome: label,
            code: o.code,
            enhanced: o.enhanced.as_deref(),
            reply: &o.text,
            stage: format!("{:?}", o.stage).to_lowercase(),
            latency_ms: o.latency_ms,
            message_id: &job.message_id,
            in_doubt,
        };
        if let Err(e) = self.dlog.write(&line) {
            error!("delivery log write failed: {e}");
        }
        self.pending.push(Record {
            job_id: job.job_id,
            update,
            attempt: job.attempt,
            code: o.code,
            enhanced: o.enhanced,
            text: o.text,
            in_doubt,
            at: now_unix,
        });
        if self.pending.len() >= 1000 {
            self.next_flush = Instant::now();
        }
    }

    /// Recomputes the retry limit from the window just measured (claims 54-59, see
    /// [`crate::retry`]); on_outcome applies it, with each job's stage, until the next tick.
    fn retry_tick(&mut self, w: &control::Window) -> crate::retry::Limit {
        if self.retry.policy.adapt.stage {
            for &id in self.specs.keys() {
                if let Ok(c) = self.spool.counts(Some(id)) {
                    let share = c.finished() as f64 / c.total.max(1) as f64;
                    self.retry.shares.insert(id, share);
                }
            }
        }
        let before = self.retry.last.value;
        let l = self
            .retry
            .tick(crate::retry::Inputs {
                previous: self.retry.last.base,
                workers: w.avg_workers,
                failure_rate: w.failure_rate,
                attempts: w.attempts,
                utilization: w.utilization,
                share_done: self.finals as f64 / self.total.max(1) as f64,
                job: None,
            })
            .clone();
        if l.value != before {
            info!("retry limit {before} -> {}: {}", l.value, l.reason());
        }
        l
    }

    /// Returns prefetched jobs that were never sent to the queue in the spool, keeping the
    /// in-doubt flag of those that came back from a dead worker.
    fn release_ready(&mut self) {
        let (doubt, clean): (Vec<LeasedJob>, Vec<LeasedJob>) =
            self.ready.drain(..).partition(|j| j.in_doubt);
        let doubt: Vec<u64> = doubt.iter().map(|j| j.job_id).collect();
        let clean: Vec<u64> = clean.iter().map(|j| j.job_id).collect();
        if let Err(e) = self
            .spool
            .release(&clean)
            .and_then(|_| self.spool.release_in_doubt(&doubt))
        {
            error!(
                "cannot release {} prefetched jobs: {e} (they are requeued, flagged in doubt, at the next start)",
                clean.len() + doubt.len()
            );
        }
    }

    fn reap(&mut self) {
        for ex in self.sup.reap() {
            self.on_exit(ex);
        }
    }

    fn on_exit(&mut self, ex: Exited) {
        let Exited {
            slot,
            pid,
            status,
            state,
            lifetime,
            jobs,
            ..
        } = ex;
        let n = jobs.len();
        // Jobs a dead worker held may have been delivered (the 250 may have been read and the
        // outcome not yet sent): they go back to the front of the queue flagged in doubt.
        for f in jobs.into_iter().rev() {
            let mut job = f.job;
            job.in_doubt = true;
            self.ready.push_front(job);
        }
        let expected =
            matches!(state, WorkerState::Draining | WorkerState::Killed) || self.stopping.is_some();
        if expected {
            info!(
                "worker={slot} pid={pid} exited ({status}) after {:.1}s, {n} jobs requeued",
                lifetime.as_secs_f64()
            );
            return;
        }
        self.restarts += 1;
        let log = self.sup.log_path(slot);
        match self.restart.failed(Instant::now()) {
            Verdict::RestartAfter(d) => {
                warn!(
                    "worker={slot} pid={pid} died ({status}) after {:.2}s holding {n} jobs (requeued); restarting in {:.1}s; see {}",
                    lifetime.as_secs_f64(),
                    d.as_secs_f64(),
                    log.display()
                );
                self.respawn_at = self.respawn_at.max(Instant::now() + d);
            }
            Verdict::Escalate { failures } => {
                self.escalated = Some(format!(
                    "workers keep failing: {failures} unexpected exits within {:.0}s (restart_intensity = {}); last: worker={slot} pid={pid} {status} after {:.2}s - see {}. Jobs stay queued; fix the worker and run the same command again.",
                    self.cfg.supervisor.restart_period.as_secs_f64(),
                    self.cfg.supervisor.restart_intensity,
                    lifetime.as_secs_f64(),
                    log.display()
                ));
            }
        }
    }

    /// Spawns or drains workers toward `desired`, and kills workers stuck in the handshake.
    fn scale(&mut self, now: Instant) {
        let stuck: Vec<u64> = self
            .sup
            .workers()
            .iter()
            .filter(|w| w.state == WorkerState::Starting && w.started.elapsed() > HANDSHAKE_TIMEOUT)
            .map(|w| w.incarnation)
            .collect();
        for inc in stuck {
            warn!(
                "worker incarnation {inc} sent no hello within {HANDSHAKE_TIMEOUT:?}: killing it"
            );
            // counted as a failure when reaped: abort keeps the state Starting
            self.sup.abort(inc);
        }
        // A worker that holds a job longer than every SMTP deadline together allows has gone
        // silent (hung, or stopped answering on its socket): its jobs would otherwise be held
        // forever. Abort it; its jobs come back flagged in doubt when it is reaped.
        let limit = job_deadline(&self.cfg.timeouts);
        let silent: Vec<(u64, u32, u32, usize)> = self
            .sup
            .workers()
            .iter()
            .filter(|w| {
                !w.aborted
                    && w.inflight
                        .values()
                        .any(|f| now.saturating_duration_since(f.sent_at) > limit)
            })
            .map(|w| (w.incarnation, w.slot, w.pid, w.inflight.len()))
            .collect();
        for (inc, slot, pid, n) in silent {
            warn!(
                "worker={slot} pid={pid} has held a job for over {:.0}s (all SMTP deadlines together): killing it; its {n} jobs are requeued in doubt",
                limit.as_secs_f64()
            );
            self.sup.abort(inc);
        }
        let alive = self.sup.count(WorkerState::Ready) + self.sup.count(WorkerState::Starting);
        if alive < self.desired && now >= self.respawn_at {
            for _ in alive..self.desired {
                match self.sup.spawn(&self.tx, Event::Worker) {
                    Ok(w) => info!("worker={} pid={} spawned", w.slot, w.pid),
                    Err(e) => {
                        self.restarts += 1;
                        match self.restart.failed(now) {
                            Verdict::RestartAfter(d) => {
                                error!(
                                    "cannot spawn {}: {e}; retrying in {:.1}s",
                                    self.opts.worker.display(),
                                    d.as_secs_f64()
                                );
                                self.respawn_at = now + d;
                            }
                            Verdict::Escalate { failures } => {
                                self.escalated = Some(format!(
                                    "cannot spawn {}: {e} ({failures} failures)",
                                    self.opts.worker.display()
                                ));
                            }
                        }
                        break;
                    }
                }
            }
        } else if alive > self.desired {
            // Drain the least busy; a worker still starting is simply killed.
            let mut cands: Vec<(usize, bool, u64)> = self
                .sup
                .workers()
                .iter()
                .filter(|w| matches!(w.state, WorkerState::Ready | WorkerState::Starting))
                .map(|w| {
                    (
                        w.inflight.len(),
                        w.state == WorkerState::Starting,
                        w.incarnation,
                    )
                })
                .collect();
            cands.sort_by_key(|&(n, starting, _)| (!starting, n));
            for &(_, starting, inc) in cands.iter().take(alive - self.desired) {
                if starting || self.kill_shed {
                    // Claim 3: when the rate must fall faster than draining allows, busy
                    // workers are killed; their jobs come back (in doubt) when reaped.
                    self.sup.kill(inc);
                } else {
                    self.sup.drain(inc);
                }
            }
        }
        self.peak_workers = self.peak_workers.max(self.sup.count(WorkerState::Ready));
    }

    fn dispatch(&mut self, now: Instant) -> Result<(), RunError> {
        if self.spool_error.is_some() {
            return Ok(());
        }
        let batch = ((self.pacer.rate() * 0.25).ceil() as usize).clamp(16, 2000);
        if self.ready.len() < batch / 2 && now >= self.next_lease {
            match self.spool.lease(unix_now(), batch - self.ready.len()) {
                Ok(jobs) => {
                    if jobs.is_empty() {
                        self.next_lease = now + Duration::from_millis(200);
                    }
                    self.ready.extend(jobs);
                }
                Err(e) => {
                    error!("spool lease failed: {e}; dispatch paused");
                    self.next_lease = now + Duration::from_secs(1);
                }
            }
        }
        if !self.ready.is_empty() {
            self.backlog_seen = true;
        }
        let mut n = self.pacer.available(now);
        let s = self.cfg.sessions as usize;
        while n > 0 && !self.ready.is_empty() {
            // least-loaded ready worker
            let Some(inc) = self
                .sup
                .workers()
                .iter()
                .filter(|w| w.state == WorkerState::Ready && !w.aborted && w.inflight.len() < s)
                .min_by_key(|w| w.inflight.len())
                .map(|w| w.incarnation)
            else {
                break;
            };
            let job = self.ready.pop_front().expect("not empty");
            if let Err(e) = self.send_job(inc, &job) {
                let (slot, pid) = self
                    .sup
                    .get(inc)
                    .map(|w| (w.slot, w.pid))
                    .unwrap_or_default();
                warn!("worker={slot} pid={pid} cannot take a job ({e}): killing it");
                self.ready.push_front(job);
                self.sup.abort(inc);
                continue;
            }
            self.pacer.take(1);
            n -= 1;
        }
        // Tokens with no work to use them are dropped. Tokens waiting for a free session are
        // kept (at most the pacer's 20 ms burst), so a moment with every session busy does
        // not cost rate: that is what lets the pool run close to full utilization.
        if n > 0 && self.ready.is_empty() {
            self.pacer.forfeit();
        }
        Ok(())
    }

    fn send_job(&mut self, inc: u64, job: &LeasedJob) -> Result<(), protocol::FrameError> {
        let needs_campaign = !self
            .sup
            .get(inc)
            .map(|w| w.campaigns.contains(&job.campaign_id))
            .unwrap_or(false);
        if needs_campaign {
            if let Some(spec) = self.specs.get(&job.campaign_id) {
                self.sup.send(inc, &ToWorker::Campaign(spec.clone()))?;
            }
            if let Some(w) = self.sup.get_mut(inc) {
                w.campaigns.insert(job.campaign_id);
            }
        }
        let frame = ToWorker::Job(protocol::Job {
            job_id: job.job_id,
            lease_id: job.lease_id,
            campaign_id: job.campaign_id,
            attempt: job.attempt,
            recipient: job.recipient.clone(),
            values: job.values.clone(),
            message_id: job.message_id.clone(),
        });
        self.sup.send(inc, &frame)?;
        if let Some(w) = self.sup.get_mut(inc) {
            w.inflight.insert(
                job.job_id,
                InFlight {
                    job: job.clone(),
                    sent_at: Instant::now(),
                },
            );
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), RunError> {
        self.next_flush = Instant::now() + FLUSH_EVERY;
        if self.pending.is_empty() {
            return Ok(());
        }
        if let Err(e) = self.dlog.flush() {
            error!("delivery log flush failed: {e}");
        }
        match self.spool.record(&self.pending) {
            Ok(()) => {
                if let Some(prev) = self.spool_error.take() {
                    info!("spool writable again (was: {prev}); dispatch resumes");
                }
                self.pending.clear();
            }
            Err(e) => {
                if self.spool_error.is_none() {
                    error!(
                        "spool write failed: {e}; dispatch paused, {} outcomes kept in memory and retried",
                        self.pending.len()
                    );
                }
                self.spool_error = Some(e.to_string());
                self.next_flush = Instant::now() + Duration::from_secs(1);
            }
        }
        Ok(())
    }

    fn busy_sessions(&self) -> usize {
        self.sup
            .workers()
            .iter()
            .filter(|w| w.state == WorkerState::Ready)
            .map(|w| w.inflight.len())
            .sum()
    }

    fn control_tick(&mut self, now: Instant) {
        self.tick += 1;
        self.next_tick = now + self.cfg.control_interval;
        self.last_decision = now;
        let ready = self.sup.count(WorkerState::Ready);
        let busy = self.busy_sessions();
        self.meter.level(now, ready, busy);
        let window = self.meter.take(now);
        let starting = self.sup.count(WorkerState::Starting);
        let remaining = self.total.saturating_sub(self.finals);
        let (target, target_why) = self
            .cfg
            .target
            .rate(unix_now(), self.started_unix, remaining);
        let interval_s = self.cfg.control_interval.as_secs_f64();
        let inputs = control::Inputs {
            now_s: now.duration_since(self.started).as_secs_f64(),
            target,
            workers: ready + starting,
            starting,
            min_workers: self.cfg.min_workers as usize,
            max_workers: self.cfg.max_workers as usize,
            backlog: self.backlog_seen || !self.ready.is_empty(),
            down_window_s: control::DOWN_WINDOW_TICKS as f64 * interval_s,
            drain_budget_s: interval_s,
            window,
        };
        let mut d = control::decide(&inputs, &self.ctl);
        if self.cfg.control == crate::config::ControlMode::Off {
            // No controller: a fixed pool at the target rate (the static-MTA baseline).
            d.workers = self.cfg.min_workers as usize;
            d.rate = target;
            d.kill = false;
            d.rate_action = control::RateAction::Hold;
            d.state.factor = 1.0;
            d.reason = format!("control off: fixed {} workers at {target:.1}/s", d.workers);
        }
        let retry = self.retry_tick(&inputs.window);
        self.backlog_seen = !self.ready.is_empty();
        if d.workers != self.desired || d.rate_action != control::RateAction::Hold {
            info!("control: {}", d.reason);
        }
        if self.stopping.is_none() {
            self.desired = d.workers;
            self.kill_shed = d.kill;
            if (d.rate - self.pacer.rate()).abs() > 1e-9 {
                self.pacer.set_rate(d.rate, now);
            }
        }
        #[derive(Serialize)]
        struct Line<'a> {
            time: f64,
            tick: u64,
            mode: crate::config::ControlMode,
            target: f64,
            target_reason: &'a str,
            rate: f64,
            rate_factor: f64,
            rate_action: control::RateAction,
            throughput: f64,
            delivered_per_s: f64,
            efficiency: f64,
            busy_efficiency: f64,
            e_busy: Option<f64>,
            utilization: f64,
            per_worker: &'a [(u32, f64)],
            failure_rate: f64,
            pushback_rate: f64,
            mix: control::Mix,
            latency_p50_ms: u32,
            latency_p95_ms: u32,
            latency_p99_ms: u32,
            period_s: f64,
            attempts: u64,
            workers: usize,
            starting: usize,
            draining: usize,
            avg_workers: f64,
            desired: usize,
            recommended: usize,
            required: f64,
            trim: f64,
            integral: f64,
            kill: bool,
            queue: usize,
            in_flight: usize,
            remaining: u64,
            retry_limit: u32,
            retry_base: u32,
            retry_inputs: &'a crate::retry::Inputs,
            retry_reason: String,
            reason: &'a str,
        }
        let w = &inputs.window;
        let line = Line {
            time: unix_now(),
            tick: self.tick,
            mode: self.cfg.control,
            target,
            target_reason: &target_why,
            rate: d.rate,
            rate_factor: d.state.factor,
            rate_action: d.rate_action,
            throughput: w.throughput,
            delivered_per_s: if w.period_s > 0.0 {
                w.delivered as f64 / w.period_s
            } else {
                0.0
            },
            efficiency: w.efficiency,
            busy_efficiency: w.busy_efficiency,
            e_busy: d.state.e_busy,
            utilization: w.utilization,
            per_worker: &w.per_worker,
            failure_rate: w.failure_rate,
            pushback_rate: w.pushback_rate,
            mix: w.mix,
            latency_p50_ms: w.latency_p50_ms,
            latency_p95_ms: w.latency_p95_ms,
            latency_p99_ms: w.latency_p99_ms,
            period_s: w.period_s,
            attempts: w.attempts,
            workers: ready,
            starting,
            draining: self.sup.count(WorkerState::Draining),
            avg_workers: w.avg_workers,
            desired: self.desired,
            recommended: d.recommended,
            required: d.required,
            trim: d.trim,
            integral: d.state.integral,
            kill: d.kill,
            queue: self.ready.len(),
            in_flight: busy,
            remaining,
            retry_limit: retry.value,
            retry_base: retry.base,
            retry_inputs: &self.retry.inputs,
            retry_reason: retry.reason(),
            reason: &d.reason,
        };
        if serde_json::to_writer(&mut self.clog, &line).is_ok() {
            let _ = self.clog.write_all(b"\n");
            let _ = self.clog.flush();
        }
        self.ctl = d.state;
    }

    fn progress(&mut self, now: Instant) {
        self.next_progress = now + Duration::from_secs(1);
        let el = now.duration_since(self.started).as_secs_f64();
        eprintln!(
            "[{el:6.1}s] final {}/{} | attempts {} ({:.1}/s, target {:.1}/s) | workers {} | queue {}",
            self.finals,
            self.total,
            self.attempts,
            self.attempts as f64 / el.max(1e-9),
            self.pacer.rate(),
            self.sup.count(WorkerState::Ready),
            self.ready.len()
        );
    }

    fn is_complete(&mut self) -> Result<bool, RunError> {
        if !self.ready.is_empty() || self.sup.workers().iter().any(|w| !w.inflight.is_empty()) {
            return Ok(false);
        }
        if self.finals < self.total {
            return Ok(false);
        }
        // In-memory counters say done: confirm with the spool after committing everything.
        self.flush()?;
        if !self.pending.is_empty() {
            return Ok(false);
        }
        let c = self
            .spool
            .counts(None)
            .map_err(|e| RunError::Runtime(e.to_string()))?;
        Ok(c.queued == 0 && c.leased == 0 && c.deferred == 0)
    }

    fn reload(&mut self) {
        let path = self.cfg.path.clone();
        match Config::load(&path) {
            Err(e) => error!("reload failed, keeping the running configuration: {e}"),
            Ok(new) => {
                let old = &self.cfg;
                let mut changes = Vec::new();
                if new.target_rate != old.target_rate {
                    changes.push(format!(
                        "target_rate {} -> {}",
                        old.target_rate, new.target_rate
                    ));
                }
                if new.min_workers != old.min_workers || new.max_workers != old.max_workers {
                    changes.push(format!(
                        "workers {}..{} -> {}..{}",
                        old.min_workers, old.max_workers, new.min_workers, new.max_workers
                    ));
                }
                if new.control_interval != old.control_interval {
                    changes.push(format!(
                        "control_interval {:?} -> {:?}",
                        old.control_interval, new.control_interval
                    ));
                }
                if new.target != old.target && new.target_rate == old.target_rate {
                    changes.push("target schedule/deadline".to_string());
                }
                if new.control != old.control {
                    changes.push(format!("control {:?} -> {:?}", old.control, new.control));
                }
                let ignored = old.restart_required_changes(&new);
                let now = Instant::now();
                // The new target is applied by the decision at the next tick (now).
                self.cfg.target_rate = new.target_rate;
                self.cfg.target = new.target;
                self.cfg.control = new.control;
                self.cfg.min_workers = new.min_workers;
                self.cfg.max_workers = new.max_workers;
                self.cfg.control_interval = new.control_interval;
                self.desired = self
                    .desired
                    .clamp(new.min_workers as usize, new.max_workers as usize);
                self.next_tick = now;
                if changes.is_empty() {
                    info!("reloaded {}: no reloadable change", path.display());
                } else {
                    info!("reloaded {}: {}", path.display(), changes.join(", "));
                }
                if !ignored.is_empty() {
                    warn!(
                        "reload: changes to {} take effect only after a restart",
                        ignored.join(", ")
                    );
                }
            }
        }
    }

    fn finish(mut self, status: Status) -> Result<Summary, RunError> {
        let grace = if status == Status::Complete {
            self.cfg.supervisor.shutdown_grace
        } else {
            Duration::from_secs(2)
        };
        // Drained workers finish on their own; the rest get Shutdown and then SIGKILL.
        for ex in self.sup.stop_all(grace) {
            let Exited { jobs, .. } = ex;
            let ids: Vec<u64> = jobs.iter().map(|f| f.job.job_id).collect();
            // Their outcome is unknown; leave them leased: the next start flags them in doubt.
            if !ids.is_empty() {
                warn!(
                    "{} jobs were in flight when workers stopped; they will be retried (in doubt) at the next start",
                    ids.len()
                );
            }
        }
        self.release_ready();
        self.flush()?;
        if !self.pending.is_empty() {
            return Err(RunError::Runtime(format!(
                "could not write {} outcomes to the spool: {}",
                self.pending.len(),
                self.spool_error.clone().unwrap_or_default()
            )));
        }
        let _ = self.dlog.flush();
        let _ = self.clog.flush();
        let c = self
            .spool
            .counts(None)
            .map_err(|e| RunError::Runtime(e.to_string()))?;
        let duration_s = self.started.elapsed().as_secs_f64();
        Ok(Summary {
            status,
            total: c.total,
            delivered: c.delivered,
            deferred: self.deferred,
            bounced: c.bounced,
            expired: c.expired,
            invalid: c.invalid,
            in_doubt: c.in_doubt,
            pending: c.queued + c.leased + c.deferred,
            attempts: self.attempts,
            duration_s,
            rate: self.attempts as f64 / duration_s.max(1e-9),
            max_workers: self.peak_workers,
            restarts: self.restarts,
            recovered: self.recovered,
        })
    }
}
