//! `governor demo`: one command that shows the whole pipeline on a fresh clone. It writes a
//! sample campaign (personalised names, some non-ASCII), starts the built-in sink on a free
//! loopback port, runs the campaign through real `mta-worker` processes at the given rate with a
//! progress line each second, and checks that the sink accepted exactly what was delivered.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, bail};

use crate::config::Config;
use crate::run::{RunOptions, Summary};
use crate::sink::{SinkOptions, start};

/// What the demo does.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Number of messages.
    pub messages: u64,
    /// Target rate, messages/s.
    pub rate: f64,
    /// Where to write the demo's files (default: a fresh temporary directory).
    pub dir: Option<PathBuf>,
    /// The mta-worker executable.
    pub worker: PathBuf,
}

const TEMPLATE: &str = "From: \"Governor Demo\" <news@demo.example>\n\
To: \"{{ first_name }} {{ last_name }}\" <{{ email }}>\n\
Subject: {{ first_name }}, your {{ city }} newsletter\n\
MIME-Version: 1.0\n\
Content-Type: text/plain; charset=utf-8\n\
Content-Transfer-Encoding: 8bit\n\
\n\
Hello {{ first_name }},\n\
\n\
This is message number {{ n }} of the governor demo, personalised for {{ city }}.\n\
.a line starting with a dot arrives intact.\n\
\n\
-- \n\
Governor Demo\n";

const FIRST: &[&str] = &[
    "Alice",
    "Bob",
    "Zoë",
    "José",
    "Ana",
    "Jean-Luc",
    "Søren",
    "李",
    "Doe, Jane",
    "O'Brien",
];
const LAST: &[&str] = &[
    "Smith",
    "Müller",
    "García",
    "Dupont",
    "Nakamura",
    "Ng",
    "Østergaard",
    "Kowalski",
];
const CITY: &[&str] = &[
    "Berlin",
    "Paris",
    "Zürich",
    "Kraków",
    "Lisboa",
    "Oslo",
    "São Paulo",
    "Tokyo",
];

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// Runs the demo and returns the run's summary. Fails if the sink did not accept exactly the
/// delivered messages.
pub fn run(opts: DemoOptions) -> anyhow::Result<Summary> {
    let dir = match opts.dir {
        Some(d) => d,
        None => std::env::temp_dir().join(format!("governor-demo-{}", std::process::id())),
    };
    if dir.join("var").exists() {
        std::fs::remove_dir_all(dir.join("var"))
            .with_context(|| format!("cleaning {}", dir.display()))?;
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut csv = String::from("email,first_name,last_name,city,n\n");
    for i in 0..opts.messages {
        let f = FIRST[i as usize % FIRST.len()];
        let l = LAST[(i / 3) as usize % LAST.len()];
        let c = CITY[(i / 7) as usize % CITY.len()];
        let _ = writeln!(
            csv,
            "user{i}@demo.example,{},{},{},{}",
            csv_field(f),
            csv_field(l),
            csv_field(c),
            i + 1
        );
    }
    std::fs::write(dir.join("recipients.csv"), csv)?;
    std::fs::write(dir.join("template.eml"), TEMPLATE)?;

    let sink = start(SinkOptions {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        latency_ms: 5,
        latency_sigma: 0.0,
        tempfail_pct: 0.0,
        permfail_pct: 0.0,
        dump: None,
        profile: Default::default(),
    })
    .context("starting the demo sink")?;
    let port = sink.addr.port();
    // Size the pool so that the rate is reachable with the sink's 5 ms latency.
    let max_workers = ((opts.rate / 400.0).ceil() as u32).clamp(2, 32);
    let config = format!(
        "# written by `governor demo`\n\
         target_rate = {rate}\n\
         min_workers = 1\n\
         max_workers = {max_workers}\n\
         sessions = 8\n\
         control_interval = 0.5\n\
         \n\
         [relay]\n\
         host = \"127.0.0.1\"\n\
         port = {port}\n\
         helo = \"demo.example\"\n\
         \n\
         [retry]\n\
         min_interval = 1.0\n\
         \n\
         [[campaign]]\n\
         name = \"demo\"\n\
         recipients = \"recipients.csv\"\n\
         template = \"template.eml\"\n\
         sender = \"bounces@demo.example\"\n",
        rate = opts.rate,
    );
    let cfg_path = dir.join("governor.toml");
    std::fs::write(&cfg_path, config)?;
    let cfg = Config::load(&cfg_path).map_err(|e| anyhow::anyhow!("{e}"))?;
    eprintln!(
        "demo: {} messages at {}/s to the sink on 127.0.0.1:{port}; files in {}",
        opts.messages,
        opts.rate,
        dir.display()
    );
    let summary = crate::run::run(
        cfg,
        RunOptions {
            worker: opts.worker,
            progress: true,
        },
    )
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let accepted = sink
        .stats
        .accepted
        .load(std::sync::atomic::Ordering::SeqCst);
    sink.stop();
    eprintln!(
        "demo: sink accepted {accepted} messages; logs in {}",
        dir.join("var/log").display()
    );
    if accepted < summary.delivered {
        bail!(
            "the sink accepted {accepted} messages but the governor counts {} delivered",
            summary.delivered
        );
    }
    Ok(summary)
}
