//! Hostile and broken input at the binary level (issue 5: config, recipients, template).
//!
//! Two tables against the real `governor` and `mta-worker` binaries and a real receiver
//! (`governor sink --dump`, which keeps a ledger of what it accepted):
//! - [`MUST_NOT_START`]: each case breaks one thing of a good setup. The run must exit 2 with
//!   exactly one line on stderr, starting `governor: `, that names the file, line or key
//!   concerned, and nothing may be sent: the receiver's ledger stays empty, no delivery attempt
//!   is logged and no job is left queued in the spool.
//! - [`BAD_ROWS`]: recipients files with broken rows among good ones. The run carries on: every
//!   good row is delivered, every broken one is stored as `invalid` in the spool with its
//!   physical line number and a reason, and logged at start-up.
//!
//! Units below the binaries have their own tables (config `errors_table`, the recipients reader
//! tests in `governor::campaign`, the template tests in `mta_worker::render`); the 1,000,000-row
//! memory measurement is a script, `scripts/rss-recipients`, since it is a measurement.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use integration::*;

/// How the governor is started for a case.
#[derive(Clone, Copy)]
enum Launch {
    /// `governor run --config <cfg> --json --worker <built worker>`.
    Plain,
    /// As above, as user `nobody` when the test runs as root (so that mode 000 means
    /// unreadable: root reads any file).
    Unprivileged,
    /// As above with the soft and hard `RLIMIT_NOFILE` set to this value in the child.
    Nofile(u64),
}

struct Case {
    name: &'static str,
    /// Changes a good campaign (one campaign `news`, 5 recipients, the simple template).
    setup: fn(&mut Campaign),
    /// Runs after the files are written; returns the config path to pass instead, if any.
    after_write: fn(&Campaign) -> Option<PathBuf>,
    /// Words the error line must contain (any one of each inner list).
    names: &'static [&'static [&'static str]],
    launch: Launch,
}

fn keep(_: &Campaign) -> Option<PathBuf> {
    None
}

fn set_template(c: &mut Campaign, t: &str) {
    c.campaigns[0].template = t.as_bytes().to_vec();
}

fn set_recipients(c: &mut Campaign, r: &[u8]) {
    c.campaigns[0].recipients = r.to_vec();
}

const MUST_NOT_START: &[Case] = &[
    // ---- config
    Case {
        name: "config: missing file",
        setup: |_| {},
        after_write: |c| Some(c.dir.join("no-such-config.toml")),
        names: &[&["no-such-config.toml"], &["No such file"]],
        launch: Launch::Plain,
    },
    Case {
        name: "config: a directory, not a file",
        setup: |_| {},
        after_write: |c| {
            let d = c.dir.join("config.d");
            std::fs::create_dir_all(&d).unwrap();
            Some(d)
        },
        names: &[&["config.d"], &["cannot read"], &["directory"]],
        launch: Launch::Plain,
    },
    Case {
        name: "config: unreadable file (mode 000)",
        setup: |_| {},
        after_write: |c| {
            use std::os::unix::fs::PermissionsExt;
            let p = c.config_path();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o000)).unwrap();
            None
        },
        names: &[&["config.toml"], &["cannot read"], &["Permission denied"]],
        launch: Launch::Unprivileged,
    },
    Case {
        name: "config: not UTF-8",
        setup: |_| {},
        after_write: |c| {
            let mut text = std::fs::read(c.config_path()).unwrap();
            text.extend_from_slice(b"# caf\xe9\n");
            std::fs::write(c.config_path(), text).unwrap();
            None
        },
        names: &[&["config.toml"], &["UTF-8"]],
        launch: Launch::Plain,
    },
    Case {
        name: "config: unknown key, closest suggested",
        setup: |c| c.extra_top = "targte_rate = 5\n".into(),
        after_write: keep,
        names: &[
            &["config.toml"],
            &["line 8"],
            &["unknown key `targte_rate`"],
            &["did you mean `target_rate`"],
        ],
        launch: Launch::Plain,
    },
    Case {
        name: "config: unknown key in a table",
        setup: |c| c.extra_top = "\n[relay_settings]\nhost = \"x\"\n".into(),
        after_write: keep,
        names: &[&["config.toml"], &["unknown key `relay_settings`"]],
        launch: Launch::Plain,
    },
    Case {
        name: "config: wrong type",
        setup: |_| {},
        after_write: |c| {
            let text = std::fs::read_to_string(c.config_path()).unwrap();
            c.rewrite_config(&text.replace("sessions = 4\n", "sessions = \"four\"\n"));
            None
        },
        names: &[
            &["config.toml"],
            &["line 6"],
            &["sessions"],
            &["invalid type"],
        ],
        launch: Launch::Plain,
    },
    Case {
        name: "config: wrong type (string for a number)",
        setup: |c| {
            c.extra_top = "\n[limits]\ntemplate_max_bytes = \"1 MiB\"\n".into();
        },
        after_write: keep,
        names: &[&["config.toml"], &["template_max_bytes"], &["invalid type"]],
        launch: Launch::Plain,
    },
    Case {
        name: "config: negative rate",
        setup: |c| c.target_rate = -5.0,
        after_write: keep,
        names: &[&["config.toml"], &["target_rate"], &["> 0"]],
        launch: Launch::Plain,
    },
    Case {
        name: "config: zero rate",
        setup: |c| c.target_rate = 0.0,
        after_write: keep,
        names: &[&["config.toml"], &["target_rate"], &["> 0"]],
        launch: Launch::Plain,
    },
    Case {
        name: "config: min_workers > max_workers",
        setup: |c| {
            c.min_workers = 5;
            c.max_workers = 2;
        },
        after_write: keep,
        names: &[&["config.toml"], &["min_workers"], &["max_workers"]],
        launch: Launch::Plain,
    },
    Case {
        name: "config: max_workers x sessions over the open-file limit",
        setup: |c| {
            c.max_workers = 16;
            c.sessions = 8;
        },
        after_write: keep,
        names: &[
            &["config.toml"],
            &["max_workers"],
            &["16 x 8"],
            &["open-files limit (128)"],
            &["ulimit -n"],
        ],
        launch: Launch::Nofile(128),
    },
    // ---- recipients
    Case {
        name: "recipients: no `email` column",
        setup: |c| set_recipients(c, b"name,address\r\nAl,a@example.com\r\n"),
        after_write: keep,
        names: &[&["news.csv"], &["line 1"], &["`email`"]],
        launch: Launch::Plain,
    },
    Case {
        name: "recipients: header not UTF-8",
        setup: |c| set_recipients(c, b"email,n\xffame\r\na@example.com,A\r\n"),
        after_write: keep,
        names: &[&["news.csv"], &["line 1"], &["UTF-8"]],
        launch: Launch::Plain,
    },
    Case {
        name: "recipients: empty file",
        setup: |c| set_recipients(c, b""),
        after_write: keep,
        names: &[&["news.csv"], &["empty"], &["header"]],
        launch: Launch::Plain,
    },
    Case {
        name: "recipients: file does not exist",
        setup: |_| {},
        after_write: |c| {
            std::fs::remove_file(c.dir.join("news.csv")).unwrap();
            None
        },
        names: &[&["news.csv"], &["No such file"]],
        launch: Launch::Plain,
    },
    Case {
        name: "recipients: a directory",
        setup: |_| {},
        after_write: |c| {
            let p = c.dir.join("news.csv");
            std::fs::remove_file(&p).unwrap();
            std::fs::create_dir(&p).unwrap();
            None
        },
        names: &[&["news.csv"]],
        launch: Launch::Plain,
    },
    // ---- template
    Case {
        name: "template: syntax error names the line",
        setup: |c| {
            set_template(
                c,
                "From: news@example.com\nTo: {{ email }}\nSubject: Hello {{ name }\n\nHi\n",
            );
        },
        after_write: keep,
        names: &[&["news.eml"], &["line 3"], &["syntax error"]],
        launch: Launch::Plain,
    },
    Case {
        name: "template: unclosed block in the body names the line",
        setup: |c| {
            set_template(
                c,
                "From: news@example.com\nTo: {{ email }}\nSubject: Hello\n\nHi\n{% if name %}\n{{ name }}\n",
            );
        },
        after_write: keep,
        names: &[
            &["news.eml"],
            &["line 6", "line 7", "line 8"],
            &["syntax error"],
        ],
        launch: Launch::Plain,
    },
    Case {
        name: "template: undefined field names it and its line",
        setup: |c| {
            set_template(
                c,
                "From: news@example.com\nTo: {{ email }}\nSubject: Hello\n\nHi {{ first_name }}\n",
            );
        },
        after_write: keep,
        names: &[
            &["news.eml"],
            &["line 5"],
            &["first_name"],
            &["email, name"],
        ],
        launch: Launch::Plain,
    },
    Case {
        name: "template: header line without a colon",
        setup: |c| {
            set_template(
                c,
                "From: news@example.com\nTo {{ email }}\nSubject: Hello\n\nHi\n",
            );
        },
        after_write: keep,
        names: &[&["news.eml"], &["line 2"], &["no colon"]],
        launch: Launch::Plain,
    },
    Case {
        name: "template: over limits.template_max_bytes",
        setup: |c| {
            c.extra_top = "\n[limits]\ntemplate_max_bytes = 64\n".into();
            set_template(c, &format!("{SIMPLE_TEMPLATE}{}\n", "padding ".repeat(10)));
        },
        after_write: keep,
        names: &[&["news.eml"], &["template_max_bytes"], &["64"]],
        launch: Launch::Plain,
    },
    Case {
        name: "template: not UTF-8",
        setup: |c| {
            c.campaigns[0].template =
                b"From: news@example.com\nTo: {{ email }}\nSubject: caf\xe9\n\nHi\n".to_vec();
        },
        after_write: keep,
        names: &[&["news.eml"], &["UTF-8"]],
        launch: Launch::Plain,
    },
];

/// Starts the governor for `cfg` as `launch` says and waits for its exit.
fn launch(cfg: &Path, launch: Launch, scratch: &Path) -> Outcome {
    let b = bins();
    let mut c = Command::new(&b.governor);
    c.arg("run")
        .arg("--config")
        .arg(cfg)
        .arg("--json")
        .arg("--worker")
        .arg(&b.worker);
    let out_path = scratch.join("governor.stdout");
    let err_path = scratch.join("governor.stderr");
    c.stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap());
    match launch {
        Launch::Plain => {}
        Launch::Unprivileged => {
            use std::os::unix::process::CommandExt;
            if nix::unistd::geteuid().is_root() {
                c.uid(65534).gid(65534);
            }
        }
        Launch::Nofile(n) => {
            use std::os::unix::process::CommandExt;
            // SAFETY: setrlimit is a plain system call, async-signal-safe.
            unsafe {
                c.pre_exec(move || {
                    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, n, n)
                        .map_err(std::io::Error::from)
                });
            }
        }
    }
    let mut p = Proc::spawn("governor", &mut c);
    let status = p.wait_timeout(Duration::from_secs(60));
    if status.is_none() {
        p.kill_all();
    }
    let read =
        |p: &Path| String::from_utf8_lossy(&std::fs::read(p).unwrap_or_default()).into_owned();
    Outcome {
        code: status.and_then(|s| s.code()),
        stdout: read(&out_path),
        stderr: read(&err_path),
    }
}

/// Jobs in the spool that are not `invalid` (0 when there is no spool).
fn jobs_not_invalid(spool: &Path) -> u64 {
    if !spool.exists() {
        return 0;
    }
    spool_states(spool)
        .iter()
        .filter(|(s, _)| s.as_str() != "invalid")
        .map(|(_, n)| n)
        .sum()
}

#[test]
fn input_that_cannot_start_a_run_exits_2_names_it_and_sends_nothing() {
    let tmp = TestDir::new("hostile-no-start");
    let peer = Peer::governor_sink(&tmp.join("received"), &[]);
    let mut failures = Vec::new();
    for (i, case) in MUST_NOT_START.iter().enumerate() {
        let dir = tmp.join(&format!("case{i}"));
        let mut camp = Campaign::new(&dir, peer.port).campaign(
            "news",
            numbered_recipients(5),
            SIMPLE_TEMPLATE,
        );
        (case.setup)(&mut camp);
        let written = camp.write();
        let cfg = (case.after_write)(&camp).unwrap_or(written);
        let out = launch(&cfg, case.launch, &dir);
        let who = format!(
            "{} (exit {:?}, stderr {:?})",
            case.name, out.code, out.stderr
        );
        eprintln!(
            "{}: exit {:?}: {}",
            case.name,
            out.code,
            out.stderr.trim_end()
        );
        let lines: Vec<&str> = out
            .stderr
            .lines()
            .filter(|l| !l.trim().is_empty())
            .collect();
        if out.code != Some(2) {
            failures.push(format!("{who}: exit code, want 2"));
        }
        match lines.as_slice() {
            [line] if line.starts_with("governor: ") => {
                for alts in case.names {
                    if !alts.iter().any(|w| line.contains(w)) {
                        failures.push(format!("{who}: the error does not name {alts:?}"));
                    }
                }
            }
            _ => failures.push(format!(
                "{who}: want one line on stderr starting \"governor: \", got {}",
                lines.len()
            )),
        }
        if count_lines(&camp.log_dir().join("delivery.jsonl")) > 0 {
            failures.push(format!("{who}: delivery attempts were logged"));
        }
        let queued = jobs_not_invalid(&camp.spool());
        if queued > 0 {
            failures.push(format!("{who}: {queued} jobs were queued in the spool"));
        }
    }
    // Nothing half-sent: the receiver accepted nothing from any case.
    if peer.count() != 0 {
        failures.push(format!("the receiver got {} messages", peer.count()));
    }
    assert!(
        failures.is_empty(),
        "{} problem(s):\n- {}",
        failures.len(),
        failures.join("\n- ")
    );
}

/// A recipients file with broken rows among good ones, run as its own campaign.
struct BadRows {
    /// Campaign name (also the file name).
    name: &'static str,
    /// The file's content.
    content: fn() -> Vec<u8>,
    /// Valid recipients, which must be delivered.
    delivered: &'static [&'static str],
    /// (line, words of the reason) of each invalid row, in line order.
    invalid: &'static [(u64, &'static str)],
}

const BAD_ROWS: &[BadRows] = &[
    BadRows {
        name: "utf8",
        content: || {
            b"email,name\r\na@example.com,Al\r\nb@example.com,B\xffb\r\nc@example.com,C\xc3\r\nd@example.com,D\xc3\xa9\r\n".to_vec()
        },
        delivered: &["a@example.com", "d@example.com"],
        invalid: &[
            (3, "invalid UTF-8 in field `name` at byte 1"),
            (4, "invalid UTF-8 in field `name` at byte 1"),
        ],
    },
    BadRows {
        name: "ragged",
        content: || {
            b"email,name\na@example.com,A\nb@example.com\nc@example.com,C,extra\n\n\"d@example.com\",\"D,\nstill D\"\ne@example.com,E"
                .to_vec()
        },
        delivered: &["a@example.com", "d@example.com", "e@example.com"],
        invalid: &[
            (3, "wrong number of columns: expected 2, got 1"),
            (4, "wrong number of columns: expected 2, got 3"),
        ],
    },
    BadRows {
        name: "bigfield",
        content: || {
            let mut v = b"email,name\r\na@example.com,A\r\nbig@example.com,\"".to_vec();
            v.resize(v.len() + 10 * 1024 * 1024, b'x');
            v.extend_from_slice(b"\"\r\nc@example.com,C\r\n");
            v
        },
        delivered: &["a@example.com", "c@example.com"],
        invalid: &[(
            3,
            "field `name` is 10485760 bytes, over field_max_bytes (65536)",
        )],
    },
    BadRows {
        name: "addresses",
        content: || {
            b"email,name\r\nnot-an-address,X\r\na@example.com,A\r\n\"a@example.com\",dup\r\nb@@example.com,B\r\n,empty\r\nc\r\n@example.com,injected\r\n"
                .to_vec()
        },
        delivered: &["a@example.com"],
        invalid: &[
            (2, "bad address in `email`: no @"),
            (4, "duplicate of line 3"),
            (5, "bad address in `email`: two @"),
            (6, "bad address in `email`: empty address"),
            (7, "wrong number of columns: expected 2, got 1"),
            (8, "bad address in `email`: missing local part"),
        ],
    },
];

#[test]
fn bad_rows_are_invalid_with_line_and_reason_and_the_run_continues() {
    let tmp = TestDir::new("hostile-rows");
    let peer = Peer::governor_sink(&tmp.join("received"), &[]);
    let mut camp = Campaign::new(&tmp.join("camp"), peer.port);
    for case in BAD_ROWS {
        camp = camp.campaign(case.name, (case.content)(), SIMPLE_TEMPLATE);
    }
    let cfg = camp.write();
    let out = run_governor(&cfg, &[], Duration::from_secs(120));
    out.expect_code(0);
    let summary = out.summary();
    let want_delivered: usize = BAD_ROWS.iter().map(|c| c.delivered.len()).sum();
    let want_invalid: usize = BAD_ROWS.iter().map(|c| c.invalid.len()).sum();
    assert_eq!(summary["delivered"], want_delivered, "{summary}");
    assert_eq!(summary["invalid"], want_invalid, "{summary}");
    assert_eq!(peer.count(), want_delivered, "receiver");

    let mut failures = Vec::new();
    let db = rusqlite::Connection::open(camp.spool()).unwrap();
    for case in BAD_ROWS {
        let rows: Vec<(String, u64, String, Option<String>)> = db
            .prepare(
                "SELECT j.state, j.line, j.recipient, j.reason FROM jobs j
                 JOIN campaigns c ON c.id = j.campaign_id WHERE c.name = ?1 ORDER BY j.line",
            )
            .unwrap()
            .query_map([case.name], |r| {
                Ok((r.get(0)?, r.get::<_, i64>(1)? as u64, r.get(2)?, r.get(3)?))
            })
            .unwrap()
            .map(Result::unwrap)
            .collect();
        let delivered: Vec<&str> = rows
            .iter()
            .filter(|r| r.0 == "delivered")
            .map(|r| r.2.as_str())
            .collect();
        if delivered != case.delivered {
            failures.push(format!(
                "{}: delivered {delivered:?}, want {:?}",
                case.name, case.delivered
            ));
        }
        let invalid: Vec<(u64, String)> = rows
            .iter()
            .filter(|r| r.0 == "invalid")
            .map(|r| (r.1, r.3.clone().unwrap_or_default()))
            .collect();
        let want: Vec<(u64, String)> = case
            .invalid
            .iter()
            .map(|(l, r)| (*l, r.to_string()))
            .collect();
        if invalid != want {
            failures.push(format!(
                "{}: invalid rows {invalid:?}, want {want:?}",
                case.name
            ));
        }
        if rows.len() != case.delivered.len() + case.invalid.len() {
            failures.push(format!("{}: rows in other states: {rows:?}", case.name));
        }
        // Each invalid row is reported at start-up with its line and reason.
        for (line, reason) in case.invalid {
            let needle = format!("campaign={} line={line} invalid row", case.name);
            if !out
                .stderr
                .lines()
                .any(|l| l.contains(&needle) && l.contains(reason))
            {
                failures.push(format!(
                    "{}: no log line {needle:?} ... {reason:?}",
                    case.name
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} problem(s):\n- {}\n--- stderr:\n{}",
        failures.len(),
        failures.join("\n- "),
        tail(&out.stderr, 4000)
    );
}
