//! The `governor` command line: parses arguments and calls the library.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use clap::{Parser, Subcommand};
use governor::config::Config;
use governor::run::{RunOptions, Summary};

#[derive(Parser)]
#[command(name = "governor", version, about = "Rate-governed bulk mail delivery")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the campaigns of a config file to completion (resumes after a crash).
    Run {
        /// The TOML configuration file.
        #[arg(long)]
        config: PathBuf,
        /// The mta-worker executable (default: the one next to this governor).
        #[arg(long)]
        worker: Option<PathBuf>,
        /// Print one JSON summary object as the last line of stdout.
        #[arg(long)]
        json: bool,
        /// Print a progress line to stderr every second.
        #[arg(long)]
        progress: bool,
    },
    /// A small SMTP server for demos and load/latency/failure profiles.
    Sink {
        /// Address to listen on, e.g. 127.0.0.1:2525.
        #[arg(long)]
        listen: SocketAddr,
        /// Delay before answering the final dot, ms (the median with --latency-sigma).
        #[arg(long, default_value_t = 0)]
        latency_ms: u64,
        /// Log-normal sigma of that delay (0: fixed).
        #[arg(long, default_value_t = 0.0)]
        latency_sigma: f64,
        /// A TOML profile that changes latency, failures and refusals over time (see
        /// governor::sink::Profile).
        #[arg(long)]
        profile: Option<PathBuf>,
        /// Percent of messages answered 451 after the dot.
        #[arg(long, default_value_t = 0.0)]
        tempfail_pct: f64,
        /// Percent of messages answered 550 after the dot.
        #[arg(long, default_value_t = 0.0)]
        permfail_pct: f64,
        /// Write every accepted message to DIR/<n>.eml and a ledger to DIR/ledger.jsonl.
        #[arg(long)]
        dump: Option<PathBuf>,
    },
    /// Draw a control log: target vs actual rate, workers, efficiency, utilization, retry limit.
    Report {
        /// The control log (control.jsonl).
        #[arg(long)]
        control_log: PathBuf,
        /// The picture to write: FILE.svg or FILE.png.
        #[arg(long)]
        out: PathBuf,
    },
    /// Build a sample campaign, deliver it to a built-in sink, and print the summary.
    Demo {
        /// Number of personalised messages.
        #[arg(long, default_value_t = 10_000)]
        messages: u64,
        /// Target rate, messages/s.
        #[arg(long, default_value_t = 2_000.0)]
        rate: f64,
        /// Print one JSON summary object as the last line of stdout.
        #[arg(long)]
        json: bool,
        /// Directory for the demo's files (default: a fresh temporary directory).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// The mta-worker executable (default: the one next to this governor).
        #[arg(long)]
        worker: Option<PathBuf>,
    },
}

fn default_worker() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("mta-worker")))
        .unwrap_or_else(|| PathBuf::from("mta-worker"))
}

fn print_summary(s: &Summary, json: bool) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "{:?}: {} jobs: {} delivered, {} bounced, {} expired, {} invalid, {} in doubt, {} pending; {} attempts ({} deferred) in {:.1}s = {:.1}/s; peak workers {}, restarts {}",
        s.status,
        s.total,
        s.delivered,
        s.bounced,
        s.expired,
        s.invalid,
        s.in_doubt,
        s.pending,
        s.attempts,
        s.deferred,
        s.duration_s,
        s.rate,
        s.max_workers,
        s.restarts
    );
    if json {
        let _ = writeln!(out, "{}", serde_json::to_string(s).unwrap_or_default());
    }
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_millis()
        .init();
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Run {
            config,
            worker,
            json,
            progress,
        } => {
            let cfg = match Config::load(&config) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("governor: {e}");
                    return ExitCode::from(2);
                }
            };
            let opts = RunOptions {
                worker: worker.unwrap_or_else(default_worker),
                progress,
            };
            match governor::run::run(cfg, opts) {
                Ok(s) => {
                    print_summary(&s, json);
                    ExitCode::from(s.status.exit_code() as u8)
                }
                Err(e) => {
                    eprintln!("governor: {e}");
                    ExitCode::from(e.exit_code() as u8)
                }
            }
        }
        Cmd::Sink {
            listen,
            latency_ms,
            latency_sigma,
            profile,
            tempfail_pct,
            permfail_pct,
            dump,
        } => {
            let profile = match profile {
                None => governor::sink::Profile::default(),
                Some(p) => match governor::sink::Profile::load(&p) {
                    Ok(p) => p,
                    Err(e) => {
                        eprintln!("governor sink: {e:#}");
                        return ExitCode::from(2);
                    }
                },
            };
            let stop = Arc::new(AtomicBool::new(false));
            for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
                if let Err(e) = signal_hook::flag::register(sig, stop.clone()) {
                    eprintln!("governor sink: cannot install signal handler: {e}");
                    return ExitCode::from(1);
                }
            }
            let opts = governor::sink::SinkOptions {
                listen,
                latency_ms,
                latency_sigma,
                tempfail_pct,
                permfail_pct,
                dump,
                profile,
            };
            match governor::sink::run_foreground(opts, stop.clone()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("governor sink: {e:#}");
                    stop.store(true, Ordering::SeqCst);
                    ExitCode::from(1)
                }
            }
        }
        Cmd::Report { control_log, out } => match governor::report::run(&control_log, &out) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("governor report: {e:#}");
                ExitCode::from(1)
            }
        },
        Cmd::Demo {
            messages,
            rate,
            json,
            dir,
            worker,
        } => {
            let opts = governor::demo::DemoOptions {
                messages,
                rate,
                dir,
                worker: worker.unwrap_or_else(default_worker),
            };
            match governor::demo::run(opts) {
                Ok(s) => {
                    print_summary(&s, json);
                    let ok = s.status == governor::run::Status::Complete
                        && s.delivered + s.invalid == s.total;
                    if ok {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::from(1)
                    }
                }
                Err(e) => {
                    eprintln!("governor demo: {e:#}");
                    ExitCode::from(1)
                }
            }
        }
    }
}
