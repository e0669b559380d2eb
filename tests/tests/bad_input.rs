//! Bad configuration, input or environment: `governor run` must exit 2 with a one-line error on
//! stderr that starts `governor: ` and names the problem, and send nothing (a real receiver,
//! Postfix smtp-sink, stays empty). Table-driven: each case breaks one thing of a good setup.

use std::path::PathBuf;
use std::time::Duration;

use integration::*;

struct Case {
    name: &'static str,
    /// Changes a good campaign.
    setup: fn(&mut Campaign),
    /// Runs after the files are written (e.g. to delete one).
    after_write: fn(&Campaign),
    /// Words the error line must contain (any one of each inner list).
    names: &'static [&'static [&'static str]],
    /// `Some(path)`: pass this `--worker`.
    worker: Option<&'static str>,
    /// Use this config path instead of the written one (relative to the campaign dir).
    config: Option<&'static str>,
}

fn nothing(_: &Campaign) {}

const CASES: &[Case] = &[
    Case {
        name: "unknown key",
        setup: |c| {
            c.extra_top = "bogus_key = 1\n".into();
        },
        after_write: nothing,
        names: &[&["bogus_key"]],
        worker: None,
        config: None,
    },
    Case {
        name: "negative target rate",
        setup: |c| {
            c.target_rate = -5.0;
        },
        after_write: nothing,
        names: &[&["target_rate"]],
        worker: None,
        config: None,
    },
    Case {
        name: "min_workers > max_workers",
        setup: |c| {
            c.min_workers = 5;
            c.max_workers = 2;
        },
        after_write: nothing,
        names: &[&["min_workers", "max_workers"]],
        worker: None,
        config: None,
    },
    Case {
        name: "missing config file",
        setup: |_| {},
        after_write: nothing,
        names: &[&["no-such-config.toml"]],
        worker: None,
        config: Some("no-such-config.toml"),
    },
    Case {
        name: "missing recipients file",
        setup: |_| {},
        after_write: |c| std::fs::remove_file(c.dir.join("news.csv")).unwrap(),
        names: &[&["news.csv"]],
        worker: None,
        config: None,
    },
    Case {
        name: "missing worker binary",
        setup: |_| {},
        after_write: nothing,
        names: &[&["/nonexistent"]],
        worker: Some("/nonexistent"),
        config: None,
    },
    Case {
        name: "template with an undefined field",
        setup: |c| {
            c.campaigns[0].template =
                b"From: a@example.com\nTo: {{ email }}\nSubject: {{ undefined_field }}\n\nHi\n"
                    .to_vec();
        },
        after_write: nothing,
        names: &[&["undefined_field"]],
        worker: None,
        config: None,
    },
];

#[test]
fn bad_config_input_or_worker_exits_2_with_one_line_and_sends_nothing() {
    let tmp = TestDir::new("bad-input");
    let peer = Peer::smtp_sink(&tmp.join("received"), &[]);
    let mut failures = Vec::new();
    for (i, case) in CASES.iter().enumerate() {
        let mut camp = Campaign::new(&tmp.join(&format!("case{i}")), peer.port).campaign(
            "news",
            numbered_recipients(5),
            SIMPLE_TEMPLATE,
        );
        (case.setup)(&mut camp);
        let mut cfg = camp.write();
        (case.after_write)(&camp);
        if let Some(c) = case.config {
            cfg = camp.dir.join(c);
        }
        let out = spawn_governor(&cfg, case.worker.map(PathBuf::from).as_deref(), &[])
            .wait(Duration::from_secs(60));
        let lines: Vec<&str> = out
            .stderr
            .lines()
            .filter(|l| !l.trim().is_empty())
            .collect();
        eprintln!(
            "{}: exit {:?}: {}",
            case.name,
            out.code,
            out.stderr.trim_end()
        );
        let who = format!(
            "{} (exit {:?}, stderr {:?})",
            case.name, out.code, out.stderr
        );
        if out.code != Some(2) {
            failures.push(format!("{who}: exit code, want 2"));
        }
        let errs: Vec<&&str> = lines
            .iter()
            .filter(|l| l.starts_with("governor: "))
            .collect();
        if errs.len() != 1 {
            failures.push(format!(
                "{who}: want exactly one line starting \"governor: \""
            ));
        } else {
            for alts in case.names {
                if !alts.iter().any(|w| errs[0].contains(w)) {
                    failures.push(format!("{who}: error line does not name {alts:?}"));
                }
            }
        }
        if lines.len() != 1 {
            failures.push(format!(
                "{who}: want a one-line error on stderr, got {} lines",
                lines.len()
            ));
        }
        if peer.count() != 0 {
            failures.push(format!("{who}: the receiver got {} messages", peer.count()));
        }
        if camp.log_dir().join("delivery.jsonl").exists()
            && count_lines(&camp.log_dir().join("delivery.jsonl")) > 0
        {
            failures.push(format!("{who}: delivery attempts were logged"));
        }
    }
    assert!(
        failures.is_empty(),
        "{} problem(s):\n- {}",
        failures.len(),
        failures.join("\n- ")
    );
}
