//! Security (issue 5): workers drop privileges, the IPC channel is a socketpair, secrets never
//! reach a log, and (in hostile_worker.rs) a worker can only act on jobs leased to it.
//!
//! - As root with `supervisor.worker_user = "nobody"`, every worker runs with nobody's uid and
//!   gid and no other group (`/proc/<pid>/status`), its fd 3 is an anonymous socket
//!   (`socket:[inode]`, nothing on the filesystem), it still dies with the governor, and its log
//!   file is owned by nobody and written. Skipped, with a printed reason, when not run as root.
//! - A `worker_user` that does not exist stops the governor at start-up (exit 2, key named).
//! - A campaign with AUTH (aiosmtpd requiring AUTH over plain text, `tls = "off"`) and a DKIM key:
//!   once with the right password (every message delivered) and once with a wrong one (every
//!   message refused at AUTH). Neither the password (plain, base64, or inside an AUTH PLAIN blob)
//!   nor the private key's body appears in any file the runs wrote (spool, WAL, delivery log,
//!   control log, worker logs) or in the governor's stdout/stderr; a config with a malformed
//!   password value is refused without quoting it.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use integration::*;

fn status_field(pid: i32, name: &str) -> Option<String> {
    let s = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
}

fn with_supervisor_key(camp: &Campaign, line: &str) -> String {
    camp.toml()
        .replacen("[supervisor]\n", &format!("[supervisor]\n{line}\n"), 1)
}

#[test]
fn workers_run_as_the_configured_user_on_a_socketpair() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED: not root, so the governor cannot drop workers to another user");
        return;
    }
    let nobody = nix::unistd::User::from_name("nobody")
        .expect("getpwnam")
        .expect("user nobody exists");
    let (uid, gid) = (nobody.uid.as_raw(), nobody.gid.as_raw());
    const N: usize = 400;
    let tmp = TestDir::new("security-user");
    let peer = Peer::governor_sink(&tmp.join("received"), &["--latency-ms", "5"]);
    let camp = Campaign::new(&tmp.join("run"), peer.port)
        .rate(100.0)
        .workers(2, 2)
        .campaign("priv", numbered_recipients(N), SIMPLE_TEMPLATE);
    let cfg = camp.write();
    camp.rewrite_config(&with_supervisor_key(&camp, "worker_user = \"nobody\""));
    let run = spawn_governor(&cfg, None, &[]);
    let mut workers = Vec::new();
    assert!(
        wait_until(Duration::from_secs(30), || {
            workers = run.workers();
            workers.len() == 2 && peer.count() > 20
        }),
        "no two working workers: {workers:?}\n{}",
        tail(&run.stderr_now(), 3000)
    );
    let want_ids = |id: u32| format!("{id} {id} {id} {id}");
    for &pid in &workers {
        assert_eq!(
            status_field(pid, "Uid"),
            Some(want_ids(uid)),
            "worker {pid} Uid"
        );
        assert_eq!(
            status_field(pid, "Gid"),
            Some(want_ids(gid)),
            "worker {pid} Gid"
        );
        assert_eq!(
            status_field(pid, "Groups"),
            Some(gid.to_string()),
            "worker {pid} supplementary groups"
        );
        let fd3 = fs::read_link(format!("/proc/{pid}/fd/3")).expect("worker has fd 3");
        let fd3 = fd3.to_string_lossy();
        assert!(
            fd3.starts_with("socket:["),
            "worker {pid} fd 3 is {fd3}, want an anonymous socket"
        );
    }
    // Dropping privileges clears PDEATHSIG in the kernel unless it is set afterwards: the
    // workers must still die with the governor.
    run.signal(Sig::SIGKILL);
    let gone = wait_until(Duration::from_secs(2), || {
        workers.iter().all(|&p| !alive(p))
    });
    for &p in &workers {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(p), Sig::SIGKILL);
    }
    assert!(gone, "workers {workers:?} survived the governor");
    drop(run);

    // The same command finishes the campaign, still as nobody.
    let out = run_governor(&cfg, &[], Duration::from_secs(120));
    out.expect_code(0);
    assert!(
        out.stderr.contains("workers run as user nobody"),
        "{}",
        tail(&out.stderr, 3000)
    );
    assert_eq!(spool_unfinished(&camp.spool()), 0);
    for slot in 0..2 {
        let log = camp.log_dir().join(format!("worker-{slot}.log"));
        let meta = fs::metadata(&log).expect("worker log");
        use std::os::unix::fs::MetadataExt;
        assert_eq!(
            (meta.uid(), meta.gid()),
            (uid, gid),
            "{} owner",
            log.display()
        );
        assert!(meta.len() > 0, "{} is empty", log.display());
    }
}

#[test]
fn unknown_worker_user_is_refused_at_start_up() {
    let tmp = TestDir::new("security-nouser");
    let camp = Campaign::new(&tmp.join("run"), free_port()).campaign(
        "x",
        numbered_recipients(3),
        SIMPLE_TEMPLATE,
    );
    let cfg = camp.write();
    camp.rewrite_config(&with_supervisor_key(
        &camp,
        "worker_user = \"no-such-user-4711\"",
    ));
    let out = run_governor(&cfg, &[], Duration::from_secs(30));
    out.expect_code(2);
    assert!(
        out.stderr.contains("supervisor.worker_user") && out.stderr.contains("no-such-user-4711"),
        "{}",
        out.stderr
    );
}

const USER: &str = "mailer";
const PASSWORD: &str = "Pw-7Hq2-zXc9-secret";
const WRONG_PASSWORD: &str = "Wrong-Kp4-mV8-secret";

/// aiosmtpd requiring AUTH with USER / PASSWORD, storing into `dir`; returns (process, port).
fn auth_peer(dir: &Path) -> (Proc, u16) {
    fs::create_dir_all(dir).unwrap();
    let script = peers_dir().join("aiosmtpd_auth.py");
    for _ in 0..5 {
        let port = free_port();
        let log = fs::File::create(dir.with_extension("peer.log")).unwrap();
        let mut c = Command::new(python());
        c.arg(&script)
            .args(["--port", &port.to_string(), "--dir"])
            .arg(dir)
            .args(["--user", USER, "--password", PASSWORD])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        let mut p = Proc::spawn("aiosmtpd-auth", &mut c);
        let up = wait_until(Duration::from_secs(20), || {
            p.try_wait().is_some() || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        if up && p.try_wait().is_none() {
            return (p, port);
        }
    }
    panic!("aiosmtpd_auth.py did not start");
}

fn stored_count(dir: &Path) -> usize {
    fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
                .count()
        })
        .unwrap_or(0)
}

/// Every regular file below `dir`, recursively.
fn files_below(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(files_below(&p));
            } else if p.is_file() {
                out.push(p);
            }
        }
    }
    out
}

fn b64(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::new();
    for c in data.chunks(3) {
        let n = (c[0] as u32) << 16
            | (*c.get(1).unwrap_or(&0) as u32) << 8
            | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= c.len() {
                s.push(T[(n >> (18 - 6 * i)) as usize & 63] as char);
            } else {
                s.push('=');
            }
        }
    }
    s
}

/// The forms in which a password could leak.
fn password_needles(pw: &str) -> Vec<String> {
    vec![
        pw.to_string(),
        b64(pw.as_bytes()),
        b64(format!("\0{USER}\0{pw}").as_bytes()),
    ]
}

fn leaks(haystack: &[u8], needles: &[String]) -> Option<String> {
    needles
        .iter()
        .find(|n| haystack.windows(n.len()).any(|w| w == n.as_bytes()))
        .cloned()
}

/// A campaign in `dir` with AUTH (`password`) and DKIM (`key_file`); returns it and its config.
fn secret_campaign(dir: &Path, port: u16, password: &str, key_file: &Path) -> (Campaign, PathBuf) {
    let mut camp = Campaign::new(dir, port).rate(200.0).workers(1, 2).campaign(
        "secret",
        numbered_recipients(30),
        SIMPLE_TEMPLATE,
    );
    camp.max_attempts = 2;
    camp.retry_min_interval = 0.2;
    camp.retry_max_interval = 0.5;
    let cfg = camp.write();
    let text = camp.toml().replacen(
        "helo = \"localhost\"\n",
        &format!("helo = \"localhost\"\nusername = \"{USER}\"\npassword = \"{password}\"\n"),
        1,
    ) + &format!(
        "\n[dkim]\ndomain = \"example.com\"\nselector = \"s1\"\nalgorithm = \"ed25519\"\nkey_file = \"{}\"\n",
        key_file.display()
    );
    camp.rewrite_config(&text);
    (camp, cfg)
}

#[test]
fn secrets_never_appear_in_logs_spool_or_output() {
    let tmp = TestDir::new("security-secrets");
    let store = tmp.join("received");
    let (_peer, port) = auth_peer(&store);
    // The DKIM key lives outside the run directories, so every file below them is fair game.
    let keys = tmp.join("keys");
    fs::create_dir_all(&keys).unwrap();
    let key_file = keys.join("dkim.pem");
    let st = Command::new("openssl")
        .args(["genpkey", "-algorithm", "ed25519", "-out"])
        .arg(&key_file)
        .status()
        .expect("run openssl");
    assert!(st.success(), "openssl genpkey failed");
    let pem = fs::read_to_string(&key_file).unwrap();
    let key_body: Vec<String> = pem
        .lines()
        .filter(|l| !l.starts_with("-----") && !l.trim().is_empty())
        .map(str::to_string)
        .collect();
    assert!(!key_body.is_empty());

    let mut needles = password_needles(PASSWORD);
    needles.extend(password_needles(WRONG_PASSWORD));
    needles.extend(key_body.iter().cloned());

    let mut problems = Vec::new();
    let mut check_output = |what: &str, out: &Outcome| {
        for (name, text) in [("stdout", &out.stdout), ("stderr", &out.stderr)] {
            if let Some(n) = leaks(text.as_bytes(), &needles) {
                problems.push(format!("{what}: {name} contains secret {n:?}"));
            }
        }
    };

    // 1. Right password: everything delivered, with a DKIM signature.
    let (good, good_cfg) = secret_campaign(&tmp.join("good"), port, PASSWORD, &key_file);
    let out = run_governor(&good_cfg, &[], Duration::from_secs(120));
    out.expect_code(0);
    assert_eq!(out.summary()["delivered"], 30, "{}", out.summary());
    assert_eq!(stored_count(&store), 30);
    let signed = files_below(&store)
        .iter()
        .filter(|p| p.extension().is_some_and(|x| x == "eml"))
        .filter(|p| {
            fs::read(p)
                .map(|b| b.windows(15).any(|w| w == b"DKIM-Signature:"))
                .unwrap_or(false)
        })
        .count();
    assert_eq!(signed, 30, "messages with a DKIM-Signature");
    check_output("right password", &out);

    // 2. Wrong password: refused at AUTH, nothing delivered, the error logged - without it.
    let (bad, bad_cfg) = secret_campaign(&tmp.join("bad"), port, WRONG_PASSWORD, &key_file);
    let out = run_governor(&bad_cfg, &[], Duration::from_secs(120));
    assert!(
        matches!(out.code, Some(0)),
        "exit {:?}\n{}",
        out.code,
        tail(&out.stderr, 3000)
    );
    assert_eq!(out.summary()["delivered"], 0, "{}", out.summary());
    assert_eq!(
        stored_count(&store),
        30,
        "a wrong password delivered something"
    );
    let auth_log = fs::read_to_string(tmp.join("auth.log")).unwrap_or_default();
    assert!(
        auth_log.contains("fail"),
        "the server saw no failed AUTH: {auth_log}"
    );
    let reasons: Vec<String> = bad
        .delivery_log()
        .iter()
        .map(|l| l["reply"].as_str().unwrap_or("").to_string())
        .collect();
    assert!(!reasons.is_empty(), "no attempts logged");
    check_output("wrong password", &out);

    // 3. A malformed password value in the config is refused without quoting it.
    let (cfg_camp, cfg_path) = secret_campaign(&tmp.join("cfg"), port, PASSWORD, &key_file);
    let text = fs::read_to_string(&cfg_path).unwrap().replace(
        &format!("password = \"{PASSWORD}\""),
        "password = 739184562018",
    );
    cfg_camp.rewrite_config(&text);
    let out = run_governor(&cfg_path, &[], Duration::from_secs(30));
    out.expect_code(2);
    if out.stderr.contains("739184562018") {
        problems.push(format!("config error quotes the password: {}", out.stderr));
    }

    // 4. Every file the runs wrote.
    for dir in [&good.dir, &bad.dir, &cfg_camp.dir] {
        for f in files_below(dir) {
            if f.file_name().is_some_and(|n| n == "config.toml") {
                continue;
            }
            let bytes = fs::read(&f).unwrap_or_default();
            if let Some(n) = leaks(&bytes, &needles) {
                problems.push(format!("{} contains secret {n:?}", f.display()));
            }
        }
    }
    let written: Vec<String> = files_below(&good.dir)
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    eprintln!("checked {} files, e.g. {:?}", written.len(), &written);
    assert!(
        problems.is_empty(),
        "{} leak(s):\n- {}",
        problems.len(),
        problems.join("\n- ")
    );
}
