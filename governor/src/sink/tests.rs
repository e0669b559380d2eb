//! The sink over real sockets, driven by a plain `std` client sending exact bytes (and once by
//! Python's smtplib as an independent client).

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;

use super::*;

fn options(tempfail_pct: f64, permfail_pct: f64, dump: Option<&Path>) -> SinkOptions {
    SinkOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        latency_ms: 0,
        latency_sigma: 0.0,
        tempfail_pct,
        permfail_pct,
        dump: dump.map(Path::to_owned),
        profile: Profile::default(),
    }
}

/// A directory removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("governor-sink-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

struct Client {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Client {
    fn connect(addr: SocketAddr) -> Self {
        let stream = TcpStream::connect(addr).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        stream.set_nodelay(true).unwrap();
        let mut c = Client {
            reader: BufReader::new(stream.try_clone().unwrap()),
            writer: stream,
        };
        let greeting = c.expect("220");
        assert!(
            greeting.ends_with(" ESMTP governor-sink\r\n"),
            "{greeting:?}"
        );
        c
    }

    fn send(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).unwrap();
    }

    /// Reads one reply, all lines of a multi-line one.
    fn reply(&mut self) -> String {
        let mut all = String::new();
        loop {
            let mut line = String::new();
            let n = self.reader.read_line(&mut line).unwrap();
            assert!(n > 0, "connection closed; got so far {all:?}");
            all.push_str(&line);
            if line.as_bytes().get(3) != Some(&b'-') {
                return all;
            }
        }
    }

    /// Reads one reply and checks that it starts with `prefix`.
    fn expect(&mut self, prefix: &str) -> String {
        let reply = self.reply();
        assert!(
            reply.starts_with(prefix),
            "wanted {prefix:?}, got {reply:?}"
        );
        reply
    }

    fn ehlo(&mut self) -> String {
        self.send(b"EHLO client.test\r\n");
        self.expect("250")
    }

    /// Asserts that nothing arrives for a short while.
    fn expect_silence(&mut self) {
        let s = self.reader.get_ref();
        s.set_read_timeout(Some(Duration::from_millis(150)))
            .unwrap();
        let mut byte = [0u8; 1];
        match self.reader.read(&mut byte) {
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            other => panic!("expected no reply yet, got {other:?} {byte:?}"),
        }
        let s = self.reader.get_ref();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    }

    fn expect_eof(&mut self) {
        let mut rest = Vec::new();
        self.reader.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "{:?}", String::from_utf8_lossy(&rest));
    }
}

fn ledger(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join(LEDGER))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn full_transaction_unstuffs_dots_and_dumps_byte_exact() {
    let tmp = TempDir::new("full");
    let sink = start(options(0.0, 0.0, Some(&tmp.0))).unwrap();
    let mut c = Client::connect(sink.addr);
    let ehlo = c.ehlo();
    for ext in [
        "PIPELINING",
        "8BITMIME",
        "SMTPUTF8",
        "SIZE 52428800",
        "ENHANCEDSTATUSCODES",
    ] {
        assert!(
            ehlo.contains(&format!("250-{ext}\r\n")) || ehlo.contains(&format!("250 {ext}\r\n"))
        );
    }
    c.send(b"MAIL FROM:<sender@example.org> BODY=8BITMIME SMTPUTF8 SIZE=300\r\n");
    c.expect("250 2.1.0");
    c.send(b"RCPT TO:<one@example.net>\r\n");
    c.expect("250 2.1.5");
    c.send("RCPT TO:<zwei@bücher.example>\r\n".as_bytes());
    c.expect("250 2.1.5");
    c.send(b"DATA\r\n");
    c.expect("354");
    c.send(
        b"Message-ID: <m1@example.org>\r\nSubject: dots\r\n\r\n..x\r\n..\r\n...\r\n.y.\r\nlast\r\n.\r\n",
    );
    let queued = c.expect("250 2.0.0");
    assert!(queued.contains("queued as 1"), "{queued:?}");
    c.send(b"QUIT\r\n");
    c.expect("221");
    c.expect_eof();

    let expected =
        b"Message-ID: <m1@example.org>\r\nSubject: dots\r\n\r\n.x\r\n.\r\n..\r\ny.\r\nlast\r\n";
    assert_eq!(std::fs::read(tmp.0.join("1.eml")).unwrap(), expected);
    let lines = ledger(&tmp.0);
    assert_eq!(lines.len(), 1);
    let l = &lines[0];
    assert_eq!(l["seq"], 1);
    assert_eq!(l["mail_from"], "sender@example.org");
    assert_eq!(
        l["rcpt"],
        serde_json::json!(["one@example.net", "zwei@bücher.example"])
    );
    assert_eq!(l["bytes"], expected.len());
    assert_eq!(l["message_id"], "<m1@example.org>");
    let now = now_secs();
    assert!(l["at"].as_u64().unwrap().abs_diff(now) < 60, "{l}");
    // Exact key order, as documented.
    let raw = std::fs::read_to_string(tmp.0.join(LEDGER)).unwrap();
    assert!(
        raw.starts_with(r#"{"seq":1,"mail_from":"sender@example.org","rcpt":["#),
        "{raw}"
    );

    let stats = sink.stats.clone();
    sink.stop();
    let s = stats.snapshot();
    assert_eq!(
        (s.connections, s.accepted, s.bytes),
        (1, 1, expected.len() as u64)
    );
    assert_eq!((s.tempfailed, s.permfailed, s.active), (0, 0, 0));
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[test]
fn pipelined_commands_in_one_write_are_answered_in_order() {
    let tmp = TempDir::new("pipelined");
    let sink = start(options(0.0, 0.0, Some(&tmp.0))).unwrap();
    let mut c = Client::connect(sink.addr);
    c.send(b"EHLO p\r\nMAIL FROM:<a@x>\r\nRCPT TO:<b@x>\r\nRCPT TO:<c@x>\r\nDATA\r\n");
    c.expect("250-");
    for _ in 0..3 {
        c.expect("250 2.1");
    }
    c.expect("354");
    // The next transaction rides in the same write as the previous message's end.
    c.send(b"one\r\n.\r\nMAIL FROM:<d@x>\r\nRCPT TO:<e@x>\r\nDATA\r\n");
    c.expect("250 2.0.0 Ok: queued as 1");
    c.expect("250 2.1.0");
    c.expect("250 2.1.5");
    c.expect("354");
    c.send(b"two\r\n.\r\nRSET\r\nNOOP\r\nQUIT\r\n");
    c.expect("250 2.0.0 Ok: queued as 2");
    c.expect("250 2.0.0");
    c.expect("250 2.0.0");
    c.expect("221");
    c.expect_eof();
    assert_eq!(std::fs::read(tmp.0.join("1.eml")).unwrap(), b"one\r\n");
    assert_eq!(std::fs::read(tmp.0.join("2.eml")).unwrap(), b"two\r\n");
    let lines = ledger(&tmp.0);
    assert_eq!(lines[0]["rcpt"], serde_json::json!(["b@x", "c@x"]));
    assert_eq!(lines[1]["mail_from"], "d@x");
    assert_eq!(lines[1]["message_id"], serde_json::Value::Null);
}

#[test]
fn terminator_split_across_writes_is_found() {
    let tmp = TempDir::new("split");
    let sink = start(options(0.0, 0.0, Some(&tmp.0))).unwrap();
    let mut c = Client::connect(sink.addr);
    c.send(b"HELO s\r\nMAIL FROM:<a@x>\r\nRCPT TO:<b@x>\r\nDATA\r\n");
    for code in ["250", "250", "250", "354"] {
        c.expect(code);
    }
    // A split inside "\r\n.\r\n" at every position, one message each.
    let pieces: [&[&[u8]]; 4] = [
        &[b"m1\r", b"\n.\r\n"],
        &[b"m2\r\n", b".\r\n"],
        &[b"m3\r\n.", b"\r\n"],
        &[b"m4\r\n.\r", b"\n"],
    ];
    for (i, parts) in pieces.iter().enumerate() {
        if i > 0 {
            c.send(b"MAIL FROM:<a@x>\r\nRCPT TO:<b@x>\r\nDATA\r\n");
            for code in ["250", "250", "354"] {
                c.expect(code);
            }
        }
        c.send(parts[0]);
        c.expect_silence();
        c.send(parts[1]);
        c.expect(&format!("250 2.0.0 Ok: queued as {}", i + 1));
    }
    for i in 1..=4 {
        let body = std::fs::read(tmp.0.join(format!("{i}.eml"))).unwrap();
        assert_eq!(body, format!("m{i}\r\n").as_bytes());
    }
    assert_eq!(sink.stats.snapshot().accepted, 4);
}

#[test]
fn rset_mid_transaction_discards_it() {
    let tmp = TempDir::new("rset");
    let sink = start(options(0.0, 0.0, Some(&tmp.0))).unwrap();
    let mut c = Client::connect(sink.addr);
    c.ehlo();
    c.send(b"MAIL FROM:<first@x>\r\nRCPT TO:<b@x>\r\nRSET\r\n");
    c.expect("250 2.1.0");
    c.expect("250 2.1.5");
    c.expect("250 2.0.0");
    c.send(b"DATA\r\n");
    c.expect("503 5.5.1");
    c.send(b"RCPT TO:<b@x>\r\n");
    c.expect("503 5.5.1");
    // A new MAIL is not "nested": the RSET ended the first transaction.
    c.send(b"MAIL FROM:<second@x>\r\nRCPT TO:<c@x>\r\nDATA\r\nbody\r\n.\r\n");
    c.expect("250 2.1.0");
    c.expect("250 2.1.5");
    c.expect("354");
    c.expect("250 2.0.0");
    let lines = ledger(&tmp.0);
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["mail_from"], "second@x");
    assert_eq!(lines[0]["rcpt"], serde_json::json!(["c@x"]));
}

#[test]
fn command_errors_and_simple_commands() {
    let sink = start(options(0.0, 0.0, None)).unwrap();
    let mut c = Client::connect(sink.addr);
    c.send(b"MAIL FROM:<a@x>\r\n");
    c.expect("503 5.5.1");
    c.send(b"HELO h\r\n");
    c.expect("250 ");
    c.send(b"FOO bar\r\n");
    c.expect("500 5.5.1");
    c.send(b"VRFY someone\r\n");
    c.expect("252");
    c.send(b"NOOP\r\n");
    c.expect("250 2.0.0");
    let long = format!("NOOP {}\r\n", "y".repeat(5000));
    c.send(long.as_bytes());
    c.expect("500 5.5.2");
    c.send(b"QUIT\r\n");
    c.expect("221 2.0.0");
    c.expect_eof();
}

#[test]
fn tempfail_100_answers_451_and_dumps_nothing() {
    let tmp = TempDir::new("tempfail");
    let sink = start(options(100.0, 0.0, Some(&tmp.0))).unwrap();
    let mut c = Client::connect(sink.addr);
    c.ehlo();
    for _ in 0..3 {
        c.send(b"MAIL FROM:<a@x>\r\nRCPT TO:<b@x>\r\nDATA\r\nhi\r\n.\r\n");
        for code in ["250", "250", "354"] {
            c.expect(code);
        }
        c.expect("451 4.3.0");
    }
    let s = sink.stats.snapshot();
    assert_eq!(
        (s.accepted, s.tempfailed, s.permfailed, s.bytes),
        (0, 3, 0, 0)
    );
    assert!(!tmp.0.join("1.eml").exists());
    assert!(ledger(&tmp.0).is_empty());
}

#[test]
fn permfail_100_answers_550() {
    let sink = start(options(0.0, 100.0, None)).unwrap();
    let mut c = Client::connect(sink.addr);
    c.ehlo();
    c.send(b"MAIL FROM:<a@x>\r\nRCPT TO:<b@x>\r\nDATA\r\nhi\r\n.\r\n");
    for code in ["250", "250", "354"] {
        c.expect(code);
    }
    c.expect("550 5.1.1");
    let s = sink.stats.snapshot();
    assert_eq!((s.accepted, s.tempfailed, s.permfailed), (0, 0, 1));
}

#[test]
fn stats_count_connections_messages_and_bytes() {
    let sink = start(options(0.0, 0.0, None)).unwrap();
    let body = b"Subject: s\r\n\r\n12345\r\n";
    for _ in 0..3 {
        let mut c = Client::connect(sink.addr);
        c.ehlo();
        for _ in 0..4 {
            c.send(b"MAIL FROM:<a@x>\r\nRCPT TO:<b@x>\r\nDATA\r\n");
            for code in ["250", "250", "354"] {
                c.expect(code);
            }
            c.send(body);
            c.send(b".\r\n");
            c.expect("250 2.0.0");
        }
        c.send(b"QUIT\r\n");
        c.expect("221");
        c.expect_eof();
    }
    let s = sink.stats.snapshot();
    assert_eq!(s.connections, 3);
    assert_eq!(s.accepted, 12);
    assert_eq!(s.bytes, 12 * body.len() as u64);
    assert_eq!(
        s.to_string(),
        format!(
            "connections=3 accepted=12 tempfailed=0 permfailed=0 bytes={}",
            12 * body.len()
        )
    );
}

#[test]
fn latency_delays_the_answer_to_the_dot_only() {
    let mut opts = options(0.0, 0.0, None);
    opts.latency_ms = 300;
    let sink = start(opts).unwrap();
    let mut c = Client::connect(sink.addr);
    c.ehlo();
    c.send(b"MAIL FROM:<a@x>\r\nRCPT TO:<b@x>\r\nDATA\r\n");
    for code in ["250", "250", "354"] {
        c.expect(code);
    }
    let sent = Instant::now();
    c.send(b"x\r\n.\r\n");
    c.expect("250 2.0.0");
    // A lower bound only: sleeping guarantees at least the latency, never at most.
    assert!(sent.elapsed() >= Duration::from_millis(300));
}

#[test]
fn stop_closes_sessions_and_the_listener() {
    let sink = start(options(0.0, 0.0, None)).unwrap();
    let addr = sink.addr;
    let mut c = Client::connect(addr);
    c.ehlo();
    sink.stop();
    c.expect_eof();
    let refused = TcpStream::connect(addr);
    assert!(refused.is_err(), "still listening after stop");
}

#[test]
fn bind_error_names_the_address() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let mut opts = options(0.0, 0.0, None);
    opts.listen = addr;
    let err = format!("{:#}", start(opts).unwrap_err());
    assert!(err.contains(&addr.to_string()), "{err}");
}

#[test]
fn bad_percentages_are_refused() {
    for (t, p) in [(-1.0, 0.0), (0.0, 101.0), (f64::NAN, 0.0), (60.0, 50.0)] {
        let err = start(options(t, p, None)).unwrap_err().to_string();
        assert!(err.contains("pct"), "{err}");
    }
}

#[test]
fn many_concurrent_sessions() {
    let mut opts = options(0.0, 0.0, None);
    opts.latency_ms = 20;
    let sink = start(opts).unwrap();
    let addr = sink.addr;
    let clients: Vec<_> = (0..200)
        .map(|_| {
            std::thread::spawn(move || {
                let mut c = Client::connect(addr);
                c.ehlo();
                for _ in 0..5 {
                    c.send(b"MAIL FROM:<a@x>\r\nRCPT TO:<b@x>\r\nDATA\r\n");
                    for code in ["250", "250", "354"] {
                        c.expect(code);
                    }
                    c.send(b"body\r\n.\r\n");
                    c.expect("250 2.0.0");
                }
                c.writer.shutdown(Shutdown::Write).unwrap();
            })
        })
        .collect();
    for t in clients {
        t.join().unwrap();
    }
    let s = sink.stats.snapshot();
    assert_eq!((s.connections, s.accepted), (200, 1000));
}

#[test]
fn python_smtplib_as_an_independent_client() {
    if Command::new("python3")
        .args(["-c", "import smtplib"])
        .status()
        .map_or(true, |s| !s.success())
    {
        eprintln!("skipping: python3 with smtplib not available");
        return;
    }
    let tmp = TempDir::new("smtplib");
    let sink = start(options(0.0, 0.0, Some(&tmp.0))).unwrap();
    // smtplib dot-stuffs, and turns LF into CRLF for a str message (a bytes message goes out with
    // bare LFs, whose dots the sink rightly leaves alone); the sink must undo only the stuffing.
    let script = r#"
import smtplib, sys
msg = "Message-ID: <py@example.org>\nSubject: dots\n\n.leading dot\n..two dots\n.\nend\n"
with smtplib.SMTP("127.0.0.1", int(sys.argv[1]), timeout=10) as s:
    s.ehlo("python.test")
    assert s.has_extn("pipelining") and s.has_extn("smtputf8"), s.esmtp_features
    refused = s.sendmail("py@example.org", ["r1@example.net", "r2@example.net"], msg)
    assert refused == {}, refused
    code, _ = s.noop()
    assert code == 250
"#;
    let out = Command::new("python3")
        .args(["-c", script, &sink.addr.port().to_string()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let expected =
        b"Message-ID: <py@example.org>\r\nSubject: dots\r\n\r\n.leading dot\r\n..two dots\r\n.\r\nend\r\n";
    assert_eq!(
        String::from_utf8_lossy(&std::fs::read(tmp.0.join("1.eml")).unwrap()),
        String::from_utf8_lossy(expected)
    );
    let lines = ledger(&tmp.0);
    assert_eq!(lines[0]["message_id"], "<py@example.org>");
    assert_eq!(
        lines[0]["rcpt"],
        serde_json::json!(["r1@example.net", "r2@example.net"])
    );
    assert_eq!(lines[0]["bytes"], expected.len());
}
