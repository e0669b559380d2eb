//! A small, fast SMTP receiver for the demo and for load, latency and failure profiles.
//!
//! # Theory of operation
//! [`start`] binds the listener on the caller's behalf and then serves on its own thread with its
//! own tokio runtime (at most 2 worker threads), so it can run beside a governor without sharing
//! its executor. Each connection is a task that reads into a buffer and lets a
//! [`session::Session`] (pure protocol state, no I/O) consume every complete command in it, then
//! writes all the replies at once: a pipelined group costs one read and one write.
//!
//! After a final dot the answer comes from [`Policy::decide`] (the only decision point, so a
//! time-varying profile can replace it): the task sleeps the decided latency asynchronously, so
//! slow answers do not hold back other sessions, then answers 250, 451 4.3.0 or 550 5.1.1. Accepted
//! messages are counted in [`SinkStats`] and, with [`SinkOptions::dump`], written to disk before
//! the 250 is sent.
//!
//! # Layout
//! - `session`: the SMTP state machine (commands, sequencing, dot-unstuffing, limits).
//! - [`policy`]: the per-message [`Decision`].
//! - `dump`: message files and the ledger.

mod dump;
pub mod policy;
mod session;

use std::fmt;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::oneshot;

pub use dump::LEDGER;
pub use policy::{DEFAULT_SEED, Decision, Phase, Policy, Profile, Settings, Verdict};

use dump::Dumper;
use session::{Event, Received, Session};

/// A session idle this long is closed with 421 (RFC 5321 4.5.3.2.7 asks servers for 5 minutes).
const IDLE_TIMEOUT: Duration = Duration::from_secs(300);
/// Writing one batch of replies must finish within this.
const WRITE_TIMEOUT: Duration = Duration::from_secs(60);
/// Bytes requested per read.
const READ_CHUNK: usize = 16 * 1024;
/// Pending connections the kernel may queue: hundreds of clients connect at once in a load run.
const BACKLOG: u32 = 1024;
/// How long [`SinkHandle::stop`] waits for in-flight dump writes.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// How the sink listens and answers.
#[derive(Clone, Debug)]
pub struct SinkOptions {
    /// Address to listen on; port 0 picks a free port (see [`SinkHandle::addr`]).
    pub listen: SocketAddr,
    /// Delay before answering the final dot (simulates receiver work); the median when
    /// `latency_sigma > 0`.
    pub latency_ms: u64,
    /// Log-normal sigma of the delay (0: every message waits exactly `latency_ms`).
    pub latency_sigma: f64,
    /// Percent of messages answered `451 4.3.0` after the dot.
    pub tempfail_pct: f64,
    /// Percent of messages answered `550 5.1.1` after the dot.
    pub permfail_pct: f64,
    /// If set, each accepted message is written to `DIR/<seq>.eml` exactly as received after
    /// dot-unstuffing (CRLF), with no added trace headers, and a line is appended to
    /// `DIR/ledger.jsonl`:
    /// `{"seq":..,"mail_from":..,"rcpt":[..],"bytes":..,"message_id":<Message-ID value or null>,"at":unix_seconds}`.
    /// `seq` numbers every message that reached its final dot, so failed ones leave gaps.
    pub dump: Option<PathBuf>,
    /// Changes of latency and failures over time (empty: the options above throughout).
    pub profile: Profile,
}

/// Counters shared with the serving thread; read them with [`SinkStats::snapshot`].
#[derive(Debug, Default)]
pub struct SinkStats {
    /// Connections accepted since start.
    pub connections: AtomicU64,
    /// Connections open now.
    pub active: AtomicU64,
    /// Messages answered 250 after the dot.
    pub accepted: AtomicU64,
    /// Messages answered 4xx after the dot (by the policy, or because the dump failed).
    pub tempfailed: AtomicU64,
    /// Messages answered 5xx after the dot by the policy.
    pub permfailed: AtomicU64,
    /// Content bytes (after dot-unstuffing) of accepted messages.
    pub bytes: AtomicU64,
    /// Connections closed before the greeting because the profile refused them.
    pub refused: AtomicU64,
}

/// A copy of [`SinkStats`] at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SinkSnapshot {
    /// See [`SinkStats::connections`].
    pub connections: u64,
    /// See [`SinkStats::active`].
    pub active: u64,
    /// See [`SinkStats::accepted`].
    pub accepted: u64,
    /// See [`SinkStats::tempfailed`].
    pub tempfailed: u64,
    /// See [`SinkStats::permfailed`].
    pub permfailed: u64,
    /// See [`SinkStats::bytes`].
    pub bytes: u64,
}

impl SinkStats {
    /// Reads every counter (each one atomically; together they are only approximately a moment).
    pub fn snapshot(&self) -> SinkSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        SinkSnapshot {
            connections: get(&self.connections),
            active: get(&self.active),
            accepted: get(&self.accepted),
            tempfailed: get(&self.tempfailed),
            permfailed: get(&self.permfailed),
            bytes: get(&self.bytes),
        }
    }
}

impl fmt::Display for SinkSnapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "connections={} accepted={} tempfailed={} permfailed={} bytes={}",
            self.connections, self.accepted, self.tempfailed, self.permfailed, self.bytes
        )
    }
}

/// A running sink. Dropping it stops the sink, like [`SinkHandle::stop`].
#[derive(Debug)]
pub struct SinkHandle {
    /// The bound address (the real port when [`SinkOptions::listen`] had port 0).
    pub addr: SocketAddr,
    /// Live counters.
    pub stats: Arc<SinkStats>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl SinkHandle {
    /// Stops accepting, closes every connection (a message waiting for its answer gets none) and
    /// joins the serving thread.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take()
            && thread.join().is_err()
        {
            log::error!("sink thread panicked addr={}", self.addr);
        }
    }
}

impl Drop for SinkHandle {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Starts a sink on its own thread and returns once it is listening.
pub fn start(opts: SinkOptions) -> anyhow::Result<SinkHandle> {
    start_seeded(opts, DEFAULT_SEED)
}

/// [`start`] with another seed for the failure decisions.
pub fn start_seeded(opts: SinkOptions, seed: u64) -> anyhow::Result<SinkHandle> {
    validate(&opts)?;
    let dumper = opts.dump.as_deref().map(Dumper::open).transpose()?;
    let stats = Arc::new(SinkStats::default());
    let shared = Arc::new(Shared {
        name: host_name(),
        policy: Policy::new(opts.clone(), seed),
        stats: stats.clone(),
        dumper: dumper.map(Arc::new),
        seq: AtomicU64::new(0),
        started: Instant::now(),
    });
    let listen = opts.listen;
    let (stop_tx, stop_rx) = oneshot::channel();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    // The runtime is built, used and dropped on the sink's thread only, so `start` may be called
    // from inside another runtime (tokio forbids blocking on or dropping one there).
    let thread = std::thread::Builder::new()
        .name("governor-sink".into())
        .spawn(move || {
            let workers = std::thread::available_parallelism().map_or(1, |n| n.get().min(2));
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(workers)
                .thread_name("governor-sink-worker")
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx
                        .send(Err(anyhow::Error::new(e)
                            .context("while building the sink's tokio runtime")));
                    return;
                }
            };
            let listener = {
                let _guard = rt.enter();
                match bind(listen) {
                    Ok(l) => l,
                    Err(e) => {
                        let _ = ready_tx.send(Err(anyhow::Error::new(e)
                            .context(format!("sink cannot listen on {listen}"))));
                        return;
                    }
                }
            };
            let addr = listener.local_addr().unwrap_or(listen);
            let _ = ready_tx.send(Ok(addr));
            rt.block_on(accept_loop(listener, shared, stop_rx));
            rt.shutdown_timeout(SHUTDOWN_GRACE);
        })
        .context("while spawning the sink thread")?;
    match ready_rx.recv() {
        Ok(Ok(addr)) => Ok(SinkHandle {
            addr,
            stats,
            stop: Some(stop_tx),
            thread: Some(thread),
        }),
        Ok(Err(e)) => {
            let _ = thread.join();
            Err(e)
        }
        Err(_) => {
            let _ = thread.join();
            anyhow::bail!("sink thread exited before listening on {listen}")
        }
    }
}

/// Runs a sink for the `governor sink` subcommand: prints `sink listening on ADDR`, serves until
/// `stop` is set, then prints one line of statistics.
pub fn run_foreground(opts: SinkOptions, stop: Arc<AtomicBool>) -> anyhow::Result<()> {
    let handle = start(opts)?;
    let mut out = io::stdout();
    writeln!(out, "sink listening on {}", handle.addr)?;
    out.flush()?;
    while !stop.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let stats = handle.stats.clone();
    handle.stop();
    writeln!(out, "sink stopped: {}", stats.snapshot())?;
    out.flush()?;
    Ok(())
}

fn validate(opts: &SinkOptions) -> anyhow::Result<()> {
    for (name, pct) in [
        ("tempfail_pct", opts.tempfail_pct),
        ("permfail_pct", opts.permfail_pct),
    ] {
        anyhow::ensure!(
            (0.0..=100.0).contains(&pct),
            "sink {name} must be a percentage between 0 and 100, got {pct}"
        );
    }
    anyhow::ensure!(
        opts.latency_sigma.is_finite() && opts.latency_sigma >= 0.0,
        "sink latency_sigma must be a number >= 0, got {}",
        opts.latency_sigma
    );
    anyhow::ensure!(
        opts.tempfail_pct + opts.permfail_pct <= 100.0,
        "sink tempfail_pct + permfail_pct must not exceed 100, got {} + {}",
        opts.tempfail_pct,
        opts.permfail_pct
    );
    Ok(())
}

fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

/// The name in the greeting: the kernel's host name, as MTAs use.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty() && !s.contains(char::is_whitespace))
        .unwrap_or_else(|| "localhost".to_owned())
}

/// State shared by all sessions of one sink.
struct Shared {
    name: String,
    policy: Policy,
    stats: Arc<SinkStats>,
    dumper: Option<Arc<Dumper>>,
    /// Messages that reached their final dot so far.
    seq: AtomicU64,
    started: Instant,
}

impl Shared {
    /// Decides, waits and records one message; returns the reply to its final dot.
    async fn finish_message(&self, msg: Received) -> String {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed) + 1;
        let decision = self.policy.decide(seq, self.started.elapsed());
        if !decision.delay.is_zero() {
            tokio::time::sleep(decision.delay).await;
        }
        let count = |c: &AtomicU64, n: u64| c.fetch_add(n, Ordering::Relaxed);
        match decision.verdict {
            Verdict::Accept => {
                let size = msg.size;
                if let Some(dumper) = &self.dumper {
                    let dumper = dumper.clone();
                    let written = tokio::task::spawn_blocking(move || dumper.write(seq, &msg))
                        .await
                        .map_err(io::Error::other)
                        .and_then(|r| r);
                    if let Err(e) = written {
                        log::warn!("sink dump failed seq={seq} error={e}");
                        count(&self.stats.tempfailed, 1);
                        return format!("451 4.3.0 Error: cannot store message {seq}");
                    }
                }
                count(&self.stats.accepted, 1);
                count(&self.stats.bytes, size);
                format!("250 2.0.0 Ok: queued as {seq}")
            }
            Verdict::TempFail => {
                count(&self.stats.tempfailed, 1);
                format!("451 4.3.0 Try again later (governor-sink message {seq})")
            }
            Verdict::PermFail => {
                count(&self.stats.permfailed, 1);
                format!("550 5.1.1 Mailbox unavailable (governor-sink message {seq})")
            }
        }
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, mut stop: oneshot::Receiver<()>) {
    loop {
        tokio::select! {
            biased;
            _ = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    if shared.policy.refuse(shared.started.elapsed()) {
                        // The profile refuses connections now: close before the greeting.
                        shared.stats.refused.fetch_add(1, Ordering::Relaxed);
                        drop(stream);
                        continue;
                    }
                    shared.stats.connections.fetch_add(1, Ordering::Relaxed);
                    tokio::spawn(connection(stream, peer, shared.clone()));
                }
                Err(e) => {
                    // Typically EMFILE under a connection storm: back off instead of spinning.
                    log::warn!("sink accept failed error={e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
}

/// Keeps [`SinkStats::active`] right even when the task is dropped at shutdown.
struct Active<'a>(&'a AtomicU64);

impl Drop for Active<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn connection(mut stream: TcpStream, peer: SocketAddr, shared: Arc<Shared>) {
    shared.stats.active.fetch_add(1, Ordering::Relaxed);
    let _active = Active(&shared.stats.active);
    if let Err(e) = serve(&mut stream, &shared).await {
        log::debug!("sink session ended peer={peer} error={e}");
    }
}

async fn serve(stream: &mut TcpStream, shared: &Shared) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let mut session = Session::new(&shared.name, shared.dumper.is_some());
    let mut input: Vec<u8> = Vec::with_capacity(READ_CHUNK);
    loop {
        let mut pos = 0;
        let close = loop {
            let (used, event) = session.feed(&input[pos..]);
            pos += used;
            match event {
                Event::NeedInput => break false,
                Event::Close => break true,
                Event::Message(msg) => {
                    let reply = shared.finish_message(msg).await;
                    session.reply(&reply);
                }
            }
        };
        input.drain(..pos);
        flush(stream, &mut session.out).await?;
        if close {
            let _ = stream.shutdown().await;
            return Ok(());
        }
        input.reserve(READ_CHUNK);
        match tokio::time::timeout(IDLE_TIMEOUT, stream.read_buf(&mut input)).await {
            Ok(Ok(0)) => return Ok(()),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                session.reply(&format!(
                    "421 4.4.2 {} Error: timeout exceeded",
                    shared.name
                ));
                flush(stream, &mut session.out).await?;
                return Ok(());
            }
        }
    }
}

async fn flush(stream: &mut TcpStream, out: &mut Vec<u8>) -> io::Result<()> {
    if out.is_empty() {
        return Ok(());
    }
    tokio::time::timeout(WRITE_TIMEOUT, stream.write_all(out))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "writing replies timed out"))??;
    out.clear();
    Ok(())
}

#[cfg(test)]
mod tests;
