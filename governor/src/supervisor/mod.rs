//! Supervision of `mta-worker` processes, in the OTP way.
//!
//! Each worker lives in a *slot* (slot numbers are reused, so `worker-<slot>.log` stays stable).
//! Every process started in a slot gets a fresh *incarnation* number, and every event from a
//! worker carries it, so a late frame from a dead process can never be mistaken for one from its
//! replacement.
//!
//! - [`spawn`]: fork/exec with the socket on fd 3, a new process group and PDEATHSIG.
//! - [`restart`]: the restart-intensity limit and back-off (pure, table-tested).
//! - this module: the worker table, the handshake, writes, reaping and stopping.

pub mod restart;
pub mod spawn;

use std::collections::{HashMap, HashSet};
use std::io;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use protocol::{FrameError, ToGovernor, ToWorker};

use crate::spool::LeasedJob;

/// Where a worker is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerState {
    /// Spawned; waiting for its Hello.
    Starting,
    /// Handshake done; accepting jobs. Only Ready workers count as *allocated*.
    Ready,
    /// Told to finish what it holds and exit; gets no new jobs.
    Draining,
    /// Killed by the governor (stop or scale-down); waiting to be reaped.
    Killed,
}

/// Something a worker's reader thread saw.
#[derive(Debug)]
pub enum WorkerEvent {
    /// A decoded frame.
    Frame(ToGovernor),
    /// The socket closed or carried an undecodable frame; the reader has stopped.
    Closed(String),
}

/// A job handed to a worker and not yet answered.
#[derive(Debug, Clone)]
pub struct InFlight {
    /// The job as leased from the spool.
    pub job: LeasedJob,
    /// When it was written to the worker.
    pub sent_at: Instant,
}

/// One worker process.
pub struct Worker {
    /// Slot number (stable across restarts).
    pub slot: u32,
    /// Unique number of this process among all started by this governor.
    pub incarnation: u64,
    /// OS process id.
    pub pid: u32,
    /// Life-cycle state.
    pub state: WorkerState,
    /// When the process was started.
    pub started: Instant,
    /// Jobs sent and not answered, by job id.
    pub inflight: HashMap<u64, InFlight>,
    /// Campaigns whose template this worker already has.
    pub campaigns: HashSet<u64>,
    /// Attempts this worker completed (any outcome).
    pub completed: u64,
    /// Messages this worker delivered.
    pub delivered: u64,
    /// SIGKILLed for misbehaving and not yet reaped: it must get no more jobs (its state is
    /// kept so that its exit still counts as a failure).
    pub aborted: bool,
    child: Child,
    stream: UnixStream,
}

/// A worker process that has exited and been reaped.
#[derive(Debug)]
pub struct Exited {
    /// Its slot.
    pub slot: u32,
    /// Its incarnation.
    pub incarnation: u64,
    /// Its pid.
    pub pid: u32,
    /// How it ended.
    pub status: ExitStatus,
    /// What state it was in: Draining or Killed exits are expected, others are failures.
    pub state: WorkerState,
    /// How long it lived.
    pub lifetime: Duration,
    /// The jobs it held; they go back to the queue.
    pub jobs: Vec<InFlight>,
}

/// The table of worker processes.
pub struct Supervisor {
    worker_path: PathBuf,
    log_dir: PathBuf,
    workers: Vec<Worker>,
    next_incarnation: u64,
    user: Option<spawn::Credentials>,
}

impl Supervisor {
    /// A supervisor with no workers yet.
    pub fn new(worker_path: PathBuf, log_dir: PathBuf) -> Self {
        Supervisor {
            worker_path,
            log_dir,
            workers: Vec::new(),
            next_incarnation: 1,
            user: None,
        }
    }

    /// Workers started from now on drop to `user` before exec (see [`spawn`]).
    pub fn run_as(&mut self, user: Option<spawn::Credentials>) {
        self.user = user;
    }

    /// Path of a slot's log file.
    pub fn log_path(&self, slot: u32) -> PathBuf {
        self.log_dir.join(format!("worker-{slot}.log"))
    }

    /// Starts a worker in the lowest free slot and a reader thread that forwards its frames.
    pub fn spawn<E: Send + 'static>(
        &mut self,
        tx: &Sender<E>,
        wrap: fn(u64, WorkerEvent) -> E,
    ) -> io::Result<&Worker> {
        let mut slot = 0;
        while self.workers.iter().any(|w| w.slot == slot) {
            slot += 1;
        }
        let log_path = self.log_path(slot);
        let spawn::Spawned { child, stream } =
            spawn::spawn(&self.worker_path, slot, &log_path, self.user)?;
        let incarnation = self.next_incarnation;
        self.next_incarnation += 1;
        // A worker that stops reading must not hang the governor: writes time out, and the
        // worker is then killed.
        stream.set_write_timeout(Some(Duration::from_secs(5)))?;
        let mut reader = stream.try_clone()?;
        let tx = tx.clone();
        std::thread::Builder::new()
            .name(format!("worker-{slot}-rx"))
            .spawn(move || {
                loop {
                    match protocol::read_frame::<_, ToGovernor>(&mut reader) {
                        Ok(msg) => {
                            if tx.send(wrap(incarnation, WorkerEvent::Frame(msg))).is_err() {
                                return;
                            }
                        }
                        Err(e) => {
                            let why = match e {
                                FrameError::Eof => "socket closed".to_string(),
                                e => e.to_string(),
                            };
                            let _ = tx.send(wrap(incarnation, WorkerEvent::Closed(why)));
                            return;
                        }
                    }
                }
            })?;
        let pid = child.id();
        self.workers.push(Worker {
            slot,
            incarnation,
            pid,
            state: WorkerState::Starting,
            started: Instant::now(),
            inflight: HashMap::new(),
            campaigns: HashSet::new(),
            completed: 0,
            delivered: 0,
            aborted: false,
            child,
            stream,
        });
        Ok(self.workers.last().expect("just pushed"))
    }

    /// All workers, in slot order of creation.
    pub fn workers(&self) -> &[Worker] {
        &self.workers
    }

    /// Mutable access to one worker by incarnation.
    pub fn get_mut(&mut self, incarnation: u64) -> Option<&mut Worker> {
        self.workers
            .iter_mut()
            .find(|w| w.incarnation == incarnation)
    }

    /// One worker by incarnation.
    pub fn get(&self, incarnation: u64) -> Option<&Worker> {
        self.workers.iter().find(|w| w.incarnation == incarnation)
    }

    /// Workers in a given state.
    pub fn count(&self, state: WorkerState) -> usize {
        self.workers.iter().filter(|w| w.state == state).count()
    }

    /// Writes a frame to a worker. An error means the worker is unusable: the caller kills it.
    pub fn send(&mut self, incarnation: u64, msg: &ToWorker) -> Result<(), FrameError> {
        let w = self
            .get_mut(incarnation)
            .ok_or_else(|| FrameError::Io(io::ErrorKind::NotFound.into()))?;
        protocol::write_frame(&mut w.stream, msg)
    }

    /// Asks a worker to finish its jobs and exit.
    pub fn drain(&mut self, incarnation: u64) {
        if self.send(incarnation, &ToWorker::Drain).is_err() {
            self.kill(incarnation);
        } else if let Some(w) = self.get_mut(incarnation) {
            w.state = WorkerState::Draining;
        }
    }

    /// SIGKILLs a worker's whole process group as a deliberate decision (scale-down, stop):
    /// its exit is expected and does not count against the restart intensity. Its jobs come
    /// back when it is reaped.
    pub fn kill(&mut self, incarnation: u64) {
        if let Some(w) = self.get_mut(incarnation) {
            w.state = WorkerState::Killed;
        }
        self.abort(incarnation);
    }

    /// SIGKILLs a worker that misbehaved (lost socket, garbage frame, stuck write). Its state
    /// is kept, so its exit counts as a failure for the restart policy.
    pub fn abort(&mut self, incarnation: u64) {
        if let Some(w) = self.get_mut(incarnation) {
            w.aborted = true;
            let pid = Pid::from_raw(w.pid as i32);
            if killpg(pid, Signal::SIGKILL).is_err() {
                let _ = w.child.kill();
            }
            let _ = w.stream.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Collects every worker that has exited (non-blocking).
    pub fn reap(&mut self) -> Vec<Exited> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < self.workers.len() {
            let status = self.workers[i].child.try_wait();
            match status {
                Ok(Some(status)) => {
                    let mut w = self.workers.swap_remove(i);
                    // Make sure nothing of its group survives (a worker may have forked helpers).
                    let _ = killpg(Pid::from_raw(w.pid as i32), Signal::SIGKILL);
                    let _ = w.stream.shutdown(std::net::Shutdown::Both);
                    let mut jobs: Vec<InFlight> = w.inflight.drain().map(|(_, j)| j).collect();
                    jobs.sort_by_key(|j| j.job.job_id);
                    out.push(Exited {
                        slot: w.slot,
                        incarnation: w.incarnation,
                        pid: w.pid,
                        status,
                        state: w.state,
                        lifetime: w.started.elapsed(),
                        jobs,
                    });
                }
                Ok(None) => i += 1,
                Err(_) => i += 1,
            }
        }
        out.sort_by_key(|e| e.slot);
        out
    }

    /// Sends Shutdown to every worker, waits up to `grace` for them to exit, then SIGKILLs the
    /// rest and reaps everything. Returns the reaped workers.
    pub fn stop_all(&mut self, grace: Duration) -> Vec<Exited> {
        let incs: Vec<u64> = self.workers.iter().map(|w| w.incarnation).collect();
        for inc in &incs {
            if self.send(*inc, &ToWorker::Shutdown).is_err() {
                self.kill(*inc);
            }
        }
        let deadline = Instant::now() + grace;
        let mut out = Vec::new();
        loop {
            out.extend(self.reap());
            if self.workers.is_empty() || Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        for inc in self
            .workers
            .iter()
            .map(|w| w.incarnation)
            .collect::<Vec<_>>()
        {
            self.kill(inc);
        }
        while !self.workers.is_empty() {
            out.extend(self.reap());
            std::thread::sleep(Duration::from_millis(5));
        }
        out
    }

    /// True if the worker binary exists and is executable; an error names the path.
    pub fn check_worker(path: &Path) -> Result<(), String> {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(path).map_err(|e| {
            format!("worker binary {}: {e} (build it with `cargo build --release` or pass --worker PATH)", path.display())
        })?;
        if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
            return Err(format!(
                "worker binary {} is not an executable file (pass --worker PATH)",
                path.display()
            ));
        }
        Ok(())
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        for w in &mut self.workers {
            let _ = killpg(Pid::from_raw(w.pid as i32), Signal::SIGKILL);
            let _ = w.child.wait();
        }
    }
}
