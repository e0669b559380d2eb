//! The worker's main loop: handshake with the governor, then jobs in, outcomes out.
//!
//! # Theory of operation
//! The IPC socket is read by one blocking thread that forwards decoded frames into a tokio
//! channel (a blocking read is the simplest correct way to notice EOF promptly), and written by
//! one blocking thread fed by another channel, so frames from concurrent jobs never interleave.
//! Jobs run as tokio tasks; the session [`Pool`] bounds them to `sessions` concurrent SMTP
//! sessions. Every job produces exactly one [`ToGovernor::Outcome`] unless the worker is told
//! to shut down (or the governor disappears), in which case unfinished jobs are abandoned: the
//! governor re-queues them.

use std::collections::HashMap;
use std::io::Write as _;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context as _, bail};
use protocol::{
    CampaignSpec, FrameError, Job, JobOutcome, PROTOCOL_VERSION, Stage, ToGovernor, ToWorker,
    Welcome, read_frame, write_frame,
};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::dkim::Signer;
use crate::outcome::{Event, classify};
use crate::render::Renderer;
use crate::session::Pool;

/// A campaign as the worker holds it: its renderer, or why it could not be compiled.
struct Campaign {
    renderer: Result<Renderer, String>,
}

/// Runs the worker on its end of the IPC socketpair until Drain, Shutdown or EOF.
///
/// Returns an error (the binary exits non-zero) when the governor rejects the handshake or
/// sends a frame that does not decode.
pub fn run(fd: OwnedFd) -> anyhow::Result<()> {
    let mut sock = UnixStream::from(fd);
    let pid = std::process::id();
    write_frame(
        &mut sock,
        &ToGovernor::Hello {
            version: PROTOCOL_VERSION,
            pid,
        },
    )
    .context("while sending Hello to the governor")?;
    let welcome = match read_frame::<_, ToWorker>(&mut sock).context("while waiting for Welcome")? {
        ToWorker::Welcome(w) => w,
        ToWorker::Reject { reason } => bail!("the governor rejected this worker: {reason}"),
        other => bail!(
            "expected Welcome from the governor, got {}",
            frame_name(&other)
        ),
    };
    init_logging(&welcome, pid)?;
    log::info!(
        "worker started sessions={} relay={}:{} tls={:?}",
        welcome.sessions,
        welcome.relay.host,
        welcome.relay.port,
        welcome.relay.tls
    );

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("while starting the tokio runtime")?;

    let (in_tx, in_rx) = mpsc::unbounded_channel();
    let mut reader = sock.try_clone().context("while cloning the IPC socket")?;
    std::thread::Builder::new()
        .name("ipc-reader".into())
        .spawn(move || {
            loop {
                let frame = read_frame::<_, ToWorker>(&mut reader);
                let stop = frame.is_err();
                if in_tx.send(frame).is_err() || stop {
                    break;
                }
            }
        })
        .context("while starting the IPC reader")?;

    let (out_tx, mut out_rx) = mpsc::unbounded_channel::<ToGovernor>();
    let mut writer = sock;
    let writer_thread = std::thread::Builder::new()
        .name("ipc-writer".into())
        .spawn(move || {
            while let Some(msg) = out_rx.blocking_recv() {
                if let Err(e) = write_frame(&mut writer, &msg) {
                    log::error!("cannot write to the governor: {e}");
                    break;
                }
            }
        })
        .context("while starting the IPC writer")?;

    let result = runtime.block_on(main_loop(welcome, in_rx, out_tx));
    match &result {
        Ok(Exit::Drained) => {
            // Every outcome is queued; let the writer flush them before exiting.
            let _ = writer_thread.join();
            log::info!("drained, exiting");
        }
        Ok(Exit::Shutdown(why)) => log::info!("shutting down: {why}"),
        Err(e) => log::error!("exiting: {e:#}"),
    }
    // Abandoned jobs must not delay a shutdown: do not wait for their tasks.
    runtime.shutdown_background();
    log::logger().flush();
    result.map(|_| ())
}

enum Exit {
    Drained,
    Shutdown(&'static str),
}

async fn main_loop(
    welcome: Welcome,
    mut input: mpsc::UnboundedReceiver<Result<ToWorker, FrameError>>,
    output: mpsc::UnboundedSender<ToGovernor>,
) -> anyhow::Result<Exit> {
    let mut pool = Pool::new(
        welcome.relay.clone(),
        welcome.timeouts.clone(),
        welcome.sessions,
    )
    .context("while preparing the SMTP session pool")?;
    if let Some(dkim) = &welcome.dkim {
        // The governor checked the key at start-up; this fails only if it changed shape since.
        let signer = Signer::new(dkim).context("while loading the DKIM key")?;
        log::info!(
            "dkim signing domain={} selector={} algorithm={:?}",
            signer.domain(),
            signer.selector(),
            dkim.algorithm
        );
        pool = pool.with_dkim(signer);
    }
    let pool = Arc::new(pool);
    let mut campaigns: HashMap<u64, Arc<Campaign>> = HashMap::new();
    let mut tasks = JoinSet::new();
    let mut draining = false;
    loop {
        if draining && tasks.is_empty() {
            pool.close_idle().await;
            return Ok(Exit::Drained);
        }
        tokio::select! {
            frame = input.recv() => match frame {
                None | Some(Err(FrameError::Eof)) => return Ok(Exit::Shutdown("the governor closed the socket")),
                Some(Err(e)) => {
                    return Err(anyhow::Error::new(e).context("while reading a frame from the governor"));
                }
                Some(Ok(ToWorker::Shutdown)) => return Ok(Exit::Shutdown("Shutdown received")),
                Some(Ok(ToWorker::Drain)) => {
                    log::info!("drain requested jobs_in_flight={}", tasks.len());
                    draining = true;
                }
                Some(Ok(ToWorker::Campaign(spec))) => {
                    let c = compile(&spec);
                    campaigns.insert(spec.campaign_id, Arc::new(c));
                }
                Some(Ok(ToWorker::Job(job))) => {
                    let campaign = campaigns.get(&job.campaign_id).cloned();
                    let (pool, output) = (pool.clone(), output.clone());
                    tasks.spawn(async move {
                        let outcome = run_job(&pool, campaign.as_deref(), &job).await;
                        let _ = output.send(ToGovernor::Outcome(outcome));
                    });
                }
                Some(Ok(other)) => log::warn!("ignoring unexpected {} frame", frame_name(&other)),
            },
            Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                if let Err(e) = done {
                    log::error!("a job task failed: {e}");
                }
            }
        }
    }
}

fn compile(spec: &CampaignSpec) -> Campaign {
    let renderer = Renderer::new(spec).map_err(|e| e.to_string());
    match &renderer {
        Ok(_) => log::info!(
            "campaign={} name={:?} template compiled",
            spec.campaign_id,
            spec.name
        ),
        Err(e) => log::error!(
            "campaign={} name={:?} template refused: {e}",
            spec.campaign_id,
            spec.name
        ),
    }
    Campaign { renderer }
}

/// Renders and delivers one job; always yields exactly one outcome.
async fn run_job(pool: &Pool, campaign: Option<&Campaign>, job: &Job) -> JobOutcome {
    let start = Instant::now();
    let (outcome, session) = match campaign.map(|c| c.renderer.as_ref()) {
        None => (
            classify(&Event::Local {
                stage: Stage::Render,
                detail: format!(
                    "no template for campaign {} (job sent before its Campaign)",
                    job.campaign_id
                ),
                permanent: true,
            }),
            0,
        ),
        Some(Err(e)) => (
            classify(&Event::Render {
                detail: format!("template refused: {e}"),
            }),
            0,
        ),
        Some(Ok(renderer)) => match renderer.render(job) {
            Err(e) => (
                classify(&Event::Render {
                    detail: e.to_string(),
                }),
                0,
            ),
            Ok(msg) => {
                let d = pool.deliver(renderer.envelope_from(), &msg).await;
                (d.outcome, d.session)
            }
        },
    };
    let latency_ms = u32::try_from(start.elapsed().as_millis()).unwrap_or(u32::MAX);
    log::info!(
        "session={session} job={} campaign={} attempt={} outcome={:?} stage={:?} code={} enhanced={} latency_ms={latency_ms} text={:?}",
        job.job_id,
        job.campaign_id,
        job.attempt,
        outcome.kind,
        outcome.stage,
        outcome.code,
        outcome.enhanced.as_deref().unwrap_or("-"),
        outcome.text,
    );
    JobOutcome {
        job_id: job.job_id,
        lease_id: job.lease_id,
        kind: outcome.kind,
        code: outcome.code,
        enhanced: outcome.enhanced,
        text: outcome.text,
        stage: outcome.stage,
        latency_ms,
        session,
    }
}

fn frame_name(f: &ToWorker) -> &'static str {
    match f {
        ToWorker::Welcome(_) => "Welcome",
        ToWorker::Reject { .. } => "Reject",
        ToWorker::Campaign(_) => "Campaign",
        ToWorker::Job(_) => "Job",
        ToWorker::Drain => "Drain",
        ToWorker::Shutdown => "Shutdown",
    }
}

/// Logs to the worker's own file, one line per event with `pid=` and `slot=` on every line;
/// `RUST_LOG` filters as usual (default `info`).
fn init_logging(welcome: &Welcome, pid: u32) -> anyhow::Result<()> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&welcome.log_path)
        .with_context(|| format!("while opening the worker log file {}", welcome.log_path))?;
    let slot = welcome.slot;
    let _ = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .target(env_logger::Target::Pipe(Box::new(file)))
        .format(move |buf, record| {
            writeln!(
                buf,
                "{} {} pid={pid} slot={slot} {}",
                buf.timestamp_millis(),
                record.level(),
                record.args()
            )
        })
        .try_init();
    Ok(())
}
