//! Real peers for the integration tests: an aiosmtpd receiver (`smtpd.py`), the dkimpy
//! verifier (`dkim_verify.py`), and keys and certificates made with the `openssl` command.
//!
//! Tests skip (with a printed reason) only when python3 lacks aiosmtpd; CI installs it.
#![allow(dead_code)] // each test binary uses its own subset

use std::io::{BufRead as _, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use mta_worker::Renderer;
use mta_worker::outcome::Classified;
use mta_worker::session::Pool;
use protocol::{CampaignSpec, Job, Relay, Timeouts, TlsMode};

const PEERS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/peers");

/// Whether `python3` can import aiosmtpd; prints why a test is skipped when it cannot.
pub fn have_aiosmtpd() -> bool {
    static HAVE: OnceLock<bool> = OnceLock::new();
    let have = *HAVE.get_or_init(|| {
        Command::new("python3")
            .args(["-c", "import aiosmtpd"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    });
    if !have {
        eprintln!(
            "SKIPPED: python3 lacks aiosmtpd (`python3 -m pip install aiosmtpd`); this test \
             needs a real SMTP receiver"
        );
    }
    have
}

/// A fresh, empty directory under the system temp dir.
pub fn temp_dir(name: &str) -> PathBuf {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let d = std::env::temp_dir().join(format!("mta-worker-{name}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A running aiosmtpd receiver storing what it accepts in `dir`.
pub struct Peer {
    /// Its TCP port on 127.0.0.1.
    pub port: u16,
    /// Where it stores messages.
    pub dir: PathBuf,
    child: Child,
    /// Closing it (on drop) makes the receiver exit even if the kill below were missed.
    _stdin: ChildStdin,
}

impl Peer {
    /// Starts `smtpd.py` with `args`; `None` (test skipped) when aiosmtpd is missing.
    pub fn start(name: &str, args: &[&str]) -> Option<Peer> {
        if !have_aiosmtpd() {
            return None;
        }
        let dir = temp_dir(name);
        let mut child = Command::new("python3")
            .arg(format!("{PEERS}/smtpd.py"))
            .arg("--dir")
            .arg(&dir)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("cannot start python3");
        let stdin = child.stdin.take().unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line
            .strip_prefix("PORT ")
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or_else(|| panic!("smtpd.py did not report its port: {line:?}"));
        Some(Peer {
            port,
            dir,
            child,
            _stdin: stdin,
        })
    }

    /// How many messages the receiver has stored.
    pub fn count(&self) -> usize {
        (1..)
            .take_while(|n| self.dir.join(format!("msg-{n}.json")).exists())
            .count()
    }

    /// Message `n` (1-based) as stored, and its envelope; waits up to 5 s for it.
    pub fn message(&self, n: usize) -> (Vec<u8>, serde_json::Value) {
        let meta = self.dir.join(format!("msg-{n}.json"));
        let start = Instant::now();
        while !meta.exists() {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "message {n} never arrived"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let bytes = std::fs::read(self.dir.join(format!("msg-{n}.eml"))).unwrap();
        let meta = serde_json::from_slice(&std::fs::read(meta).unwrap()).unwrap();
        (bytes, meta)
    }

    /// Path of stored message `n`.
    pub fn message_path(&self, n: usize) -> PathBuf {
        self.dir.join(format!("msg-{n}.eml"))
    }

    /// For every AUTH command received: whether the connection was encrypted at that moment.
    pub fn auth_events(&self) -> Vec<bool> {
        self.auth_log().into_iter().map(|(_, tls)| tls).collect()
    }

    /// For every AUTH command received: its mechanism and whether the connection was encrypted.
    pub fn auth_log(&self) -> Vec<(String, bool)> {
        std::fs::read_to_string(self.dir.join("events.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                (
                    v["mechanism"].as_str().unwrap_or("").to_string(),
                    v["tls"] == true,
                )
            })
            .collect()
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Relay settings towards a local peer.
pub fn relay(host: &str, port: u16, tls: TlsMode) -> Relay {
    Relay {
        host: host.into(),
        port,
        tls,
        auth: None,
        helo: "worker.test".into(),
        ca_file: None,
        insecure_skip_verify: false,
    }
}

/// Short deadlines, so a wrong wait fails fast.
pub fn timeouts() -> Timeouts {
    Timeouts {
        connect_ms: 3000,
        greeting_ms: 3000,
        ehlo_ms: 3000,
        mail_ms: 3000,
        rcpt_ms: 3000,
        data_ms: 3000,
        final_dot_ms: 3000,
        idle_ms: 10_000,
    }
}

/// A campaign of one template.
pub fn campaign(template: &str, fields: &[&str]) -> Renderer {
    Renderer::new(&CampaignSpec {
        campaign_id: 1,
        name: "test".into(),
        template: template.into(),
        sender: "news@example.com".into(),
        fields: fields.iter().map(|f| f.to_string()).collect(),
    })
    .unwrap()
}

/// Renders one job of `r` and delivers it through `pool`.
pub async fn send(pool: &Pool, r: &Renderer, recipient: &str, values: &[&str]) -> Classified {
    let job = Job {
        job_id: 1,
        lease_id: 1,
        campaign_id: 1,
        attempt: 1,
        recipient: recipient.into(),
        values: values.iter().map(|v| v.to_string()).collect(),
        message_id: "m1@example.com".into(),
    };
    let msg = r.render(&job).expect("renders");
    pool.deliver(r.envelope_from(), &msg).await.outcome
}

/// Runs `openssl` with `args` in `dir`, panicking with its stderr on failure.
pub fn openssl(dir: &Path, args: &[&str]) -> Vec<u8> {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("the openssl command is needed to make test keys");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// A test CA and a server certificate it signed for `localhost` and 127.0.0.1.
pub struct Certs {
    /// The CA certificate (what `ca_file` trusts).
    pub ca: PathBuf,
    /// The server's certificate.
    pub cert: PathBuf,
    /// The server's key.
    pub key: PathBuf,
    dir: PathBuf,
}

impl Certs {
    /// Generates them with the `openssl` command (EC P-256, valid two days).
    pub fn generate() -> Certs {
        let dir = temp_dir("certs");
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        let mut args = vec!["req", "-x509"];
        args.extend(ec);
        args.extend([
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=governor test CA",
        ]);
        openssl(&dir, &args);
        let mut args = vec!["req"];
        args.extend(ec);
        args.extend([
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=localhost",
        ]);
        openssl(&dir, &args);
        std::fs::write(
            dir.join("ext.cnf"),
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n\
             extendedKeyUsage=serverAuth\n",
        )
        .unwrap();
        openssl(
            &dir,
            &[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                "server.pem",
                "-days",
                "2",
                "-extfile",
                "ext.cnf",
            ],
        );
        Certs {
            ca: dir.join("ca.pem"),
            cert: dir.join("server.pem"),
            key: dir.join("server.key"),
            dir,
        }
    }

    /// `--cert <pem> --key <pem>` for smtpd.py.
    pub fn args(&self) -> Vec<String> {
        vec![
            "--cert".into(),
            self.cert.display().to_string(),
            "--key".into(),
            self.key.display().to_string(),
        ]
    }
}

impl Drop for Certs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Header field names of a stored message, lower-case, in order.
pub fn header_names(msg: &[u8]) -> Vec<String> {
    let text = String::from_utf8_lossy(msg);
    let head = text.split("\r\n\r\n").next().unwrap_or("");
    head.split("\r\n")
        .filter(|l| !l.starts_with([' ', '\t']) && !l.is_empty())
        .map(|l| l.split(':').next().unwrap().to_ascii_lowercase())
        .collect()
}

/// The invariants of every message on the wire: CRLF only, no line over 998 octets.
pub fn assert_clean(msg: &[u8]) {
    for (i, &b) in msg.iter().enumerate() {
        if b == b'\n' {
            assert!(i > 0 && msg[i - 1] == b'\r', "bare LF at {i}");
        }
        if b == b'\r' {
            assert_eq!(msg.get(i + 1), Some(&b'\n'), "bare CR at {i}");
        }
    }
    for l in msg.split(|&b| b == b'\n') {
        assert!(l.len() <= 999, "line of {} octets", l.len() - 1);
    }
}

/// Decodes a quoted-printable body.
pub fn qp_decode(s: &[u8]) -> Vec<u8> {
    let s = String::from_utf8(s.to_vec()).unwrap().replace("=\r\n", "");
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'=' {
            out.push(u8::from_str_radix(&s[i + 1..i + 3], 16).unwrap());
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

/// The body of a stored message (after the first empty line).
pub fn body(msg: &[u8]) -> &[u8] {
    let i = msg.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    &msg[i + 4..]
}

/// The unfolded value of the first header field `name`.
pub fn header(msg: &[u8], name: &str) -> Option<String> {
    let text = String::from_utf8_lossy(msg).to_string();
    let head = text
        .split("\r\n\r\n")
        .next()
        .unwrap_or("")
        .replace("\r\n ", " ")
        .replace("\r\n\t", " ");
    head.split("\r\n").find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
    })
}
