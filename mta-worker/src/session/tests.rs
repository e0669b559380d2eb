//! Session tests against a scripted SMTP server that plays exact reply bytes, split across
//! writes where it matters (FAULTS.md F1, F2, F4, F5, F9-F14; the message-bytes cases are also
//! checked through a real receiver in `tests/receiver.rs`, TLS in `tests/tls.rs`).

use std::sync::Arc;
use std::time::Duration;

use protocol::{OutcomeKind, Relay, Stage, Timeouts, TlsMode};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::sync::Mutex;

use super::*;
use crate::outcome::Classified;

/// One step of a scripted connection.
#[derive(Clone)]
enum Step {
    /// Write these bytes, each element in its own TCP write with a pause between.
    Send(&'static [&'static str]),
    /// Read one command line and check its start.
    Expect(&'static str),
    /// Read the message up to the final dot (recorded).
    Data,
    /// Stay silent (and keep the connection open) for this long.
    Hang(u64),
}
use Step::*;

/// What the server saw on each connection, in order.
type Seen = Arc<Mutex<Vec<Vec<u8>>>>;

/// Serves one script per accepted connection; returns the port and the record.
async fn server(scripts: Vec<Vec<Step>>) -> (u16, Seen) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen: Seen = Arc::default();
    let rec = seen.clone();
    tokio::spawn(async move {
        for script in scripts {
            let Ok((sock, _)) = listener.accept().await else {
                return;
            };
            let rec = rec.clone();
            let idx = {
                let mut r = rec.lock().await;
                r.push(Vec::new());
                r.len() - 1
            };
            tokio::spawn(async move {
                let (rd, mut wr) = sock.into_split();
                let mut rd = BufReader::new(rd);
                for step in script {
                    match step {
                        Send(parts) => {
                            for p in parts {
                                if wr.write_all(p.as_bytes()).await.is_err() {
                                    return;
                                }
                                let _ = wr.flush().await;
                                tokio::time::sleep(Duration::from_millis(20)).await;
                            }
                        }
                        Expect(prefix) => {
                            let mut line = String::new();
                            if rd.read_line(&mut line).await.unwrap_or(0) == 0 {
                                panic!("connection closed while expecting {prefix:?}");
                            }
                            rec.lock().await[idx].extend_from_slice(line.as_bytes());
                            assert!(
                                line.starts_with(prefix),
                                "expected {prefix:?}, got {line:?}"
                            );
                        }
                        Data => loop {
                            let mut line = Vec::new();
                            if rd.read_until(b'\n', &mut line).await.unwrap_or(0) == 0 {
                                return;
                            }
                            rec.lock().await[idx].extend_from_slice(&line);
                            if line == b".\r\n" {
                                break;
                            }
                        },
                        Hang(ms) => tokio::time::sleep(Duration::from_millis(ms)).await,
                    }
                }
                // Drain whatever the client still says (QUIT) until it closes.
                let mut rest = Vec::new();
                let _ = tokio::time::timeout(Duration::from_millis(200), rd.read_to_end(&mut rest))
                    .await;
            });
        }
    });
    (port, seen)
}

fn pool(port: u16, t: Timeouts) -> Pool {
    let relay = Relay {
        host: "127.0.0.1".into(),
        port,
        tls: TlsMode::Off,
        auth: None,
        helo: "worker.test".into(),
        ca_file: None,
        insecure_skip_verify: false,
    };
    Pool::new(relay, t, 1).unwrap()
}

fn fast() -> Timeouts {
    Timeouts {
        connect_ms: 1000,
        greeting_ms: 300,
        ehlo_ms: 1000,
        mail_ms: 1000,
        rcpt_ms: 1000,
        data_ms: 1000,
        final_dot_ms: 300,
        idle_ms: 10_000,
    }
}

fn msg(body: &str) -> Rendered {
    Rendered {
        bytes: body.as_bytes().to_vec(),
        envelope_to: "rcpt@example.com".into(),
        needs_smtputf8: false,
        eight_bit: !body.is_ascii(),
    }
}

const GREET: Step = Send(&["220 sink.test ESMTP\r\n"]);
const EHLO_PLAIN: [Step; 2] = [
    Expect("EHLO worker.test"),
    Send(&["250-sink.test\r\n250-8BITMIME\r\n250 SIZE 100000\r\n"]),
];

fn ok_transaction() -> Vec<Step> {
    vec![
        Expect("MAIL FROM:<news@example.com>"),
        Send(&["250 2.1.0 Ok\r\n"]),
        Expect("RCPT TO:<rcpt@example.com>"),
        Send(&["250 2.1.5 Ok\r\n"]),
        Expect("DATA"),
        Send(&["354 go ahead\r\n"]),
        Data,
        Send(&["250 2.0.0 Ok: queued as 1\r\n"]),
    ]
}

fn script(parts: Vec<Vec<Step>>) -> Vec<Step> {
    parts.into_iter().flatten().collect()
}

fn data_of(seen: &[u8]) -> Vec<u8> {
    let s = seen;
    let start = s.windows(6).position(|w| w == b"DATA\r\n").unwrap() + 6;
    let end = s[start..]
        .windows(5)
        .position(|w| w == b"\r\n.\r\n")
        .unwrap()
        + start
        + 5;
    s[start..end].to_vec()
}

#[test]
fn dot_stuffing_is_done_exactly_once() {
    assert_eq!(
        dot_stuff(b"A: b\r\n\r\n.test\r\n.\r\n..\r\n"),
        b"A: b\r\n\r\n..test\r\n..\r\n...\r\n.\r\n"
    );
    assert_eq!(dot_stuff(b".first"), b"..first\r\n.\r\n");
    assert_eq!(dot_stuff(b""), b".\r\n");
    // F2: a bare LF never lets a dot end DATA early; normalising is idempotent.
    assert_eq!(
        dot_stuff(b"Hi\n.\nBye\r\na\rb\r\n"),
        b"Hi\r\n..\r\nBye\r\na\r\nb\r\n.\r\n"
    );
    assert_eq!(dot_stuff(b"abc\r\n"), b"abc\r\n.\r\n");
}

#[tokio::test]
async fn delivers_and_stuffs_dots_and_reuses_the_connection() {
    let conn = script(vec![
        vec![GREET],
        EHLO_PLAIN.to_vec(),
        ok_transaction(),
        ok_transaction(),
    ]);
    let (port, seen) = server(vec![conn]).await;
    let p = pool(port, fast());
    let body = ".first line\r\nSubject: x\r\n\r\n.test\r\n.\r\n..\r\nend\r\n";
    let d = p.deliver("news@example.com", &msg(body)).await;
    assert_eq!(d.outcome.kind, OutcomeKind::Delivered, "{:?}", d.outcome);
    assert_eq!(
        (d.outcome.code, d.outcome.enhanced.as_deref()),
        (250, Some("2.0.0"))
    );
    assert_eq!(d.outcome.text, "2.0.0 Ok: queued as 1");
    let d2 = p
        .deliver("news@example.com", &msg("Subject: y\r\n\r\nsecond"))
        .await;
    assert_eq!(d2.outcome.kind, OutcomeKind::Delivered, "{:?}", d2.outcome);
    p.close_idle().await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let seen = seen.lock().await;
    assert_eq!(seen.len(), 1, "the second job reused the connection");
    assert_eq!(
        data_of(&seen[0]),
        b"..first line\r\nSubject: x\r\n\r\n..test\r\n..\r\n...\r\nend\r\n.\r\n"
    );
    let text = String::from_utf8_lossy(&seen[0]);
    assert!(
        !text.contains("RSET"),
        "no RSET after a delivered message: {text}"
    );
    assert!(!text.contains("BODY=8BITMIME"), "7-bit message: {text}");
}

#[tokio::test]
async fn rcpt_450_then_rset_before_next_mail() {
    let conn = script(vec![
        vec![GREET],
        EHLO_PLAIN.to_vec(),
        vec![
            Expect("MAIL FROM:"),
            Send(&["250 Ok\r\n"]),
            Expect("RCPT TO:"),
            Send(&["450 4.7.0 rate limit\r\n"]),
            Expect("RSET"),
            Send(&["250 2.0.0 Ok\r\n"]),
        ],
        ok_transaction(),
    ]);
    let (port, seen) = server(vec![conn]).await;
    let p = pool(port, fast());
    let d = p
        .deliver("news@example.com", &msg("Subject: x\r\n\r\nhi\r\n"))
        .await;
    assert_eq!(
        (
            d.outcome.kind,
            d.outcome.code,
            d.outcome.stage,
            d.outcome.text.as_str()
        ),
        (OutcomeKind::Deferred, 450, Stage::Rcpt, "4.7.0 rate limit")
    );
    let d = p
        .deliver("news@example.com", &msg("Subject: x\r\n\r\nhi\r\n"))
        .await;
    assert_eq!(d.outcome.kind, OutcomeKind::Delivered, "{:?}", d.outcome);
    assert_eq!(seen.lock().await.len(), 1);
}

#[tokio::test]
async fn data_421_closes_the_connection() {
    let first = script(vec![
        vec![GREET],
        EHLO_PLAIN.to_vec(),
        vec![
            Expect("MAIL FROM:"),
            Send(&["250 Ok\r\n"]),
            Expect("RCPT TO:"),
            Send(&["250 Ok\r\n"]),
            Expect("DATA"),
            Send(&["421 4.4.2 closing connection\r\n"]),
        ],
    ]);
    let second = script(vec![vec![GREET], EHLO_PLAIN.to_vec(), ok_transaction()]);
    let (port, seen) = server(vec![first, second]).await;
    let p = pool(port, fast());
    let d = p
        .deliver("news@example.com", &msg("Subject: x\r\n\r\nhi\r\n"))
        .await;
    assert_eq!(
        (
            d.outcome.kind,
            d.outcome.code,
            d.outcome.stage,
            d.outcome.reusable
        ),
        (OutcomeKind::Deferred, 421, Stage::Data, false)
    );
    let d = p
        .deliver("news@example.com", &msg("Subject: x\r\n\r\nhi\r\n"))
        .await;
    assert_eq!(d.outcome.kind, OutcomeKind::Delivered, "{:?}", d.outcome);
    let seen = seen.lock().await;
    assert_eq!(seen.len(), 2, "a fresh connection after 421");
    assert!(!String::from_utf8_lossy(&seen[0]).contains("RSET"));
}

#[tokio::test]
async fn server_that_never_greets_is_deferred_at_greeting() {
    let (port, _seen) = server(vec![vec![Hang(3000)]]).await;
    let p = pool(port, fast());
    let start = std::time::Instant::now();
    let d = p
        .deliver("news@example.com", &msg("Subject: x\r\n\r\nhi\r\n"))
        .await;
    assert_eq!(
        (d.outcome.kind, d.outcome.stage, d.outcome.code),
        (OutcomeKind::Deferred, Stage::Greeting, 0)
    );
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
}

#[tokio::test]
async fn negative_greeting_is_classified() {
    let (port, _) = server(vec![
        vec![Send(&["421 4.3.2 Too many connections\r\n"])],
        vec![Send(&["554 5.7.1 not allowed\r\n"])],
    ])
    .await;
    let p = pool(port, fast());
    let d = p.deliver("news@example.com", &msg("x")).await;
    assert_eq!(
        (d.outcome.kind, d.outcome.stage, d.outcome.code),
        (OutcomeKind::Deferred, Stage::Greeting, 421)
    );
    let d = p.deliver("news@example.com", &msg("x")).await;
    assert_eq!(
        (d.outcome.kind, d.outcome.stage, d.outcome.code),
        (OutcomeKind::Bounced, Stage::Greeting, 554)
    );
}

#[tokio::test]
async fn no_answer_after_final_dot_is_in_doubt() {
    let conn = script(vec![
        vec![GREET],
        EHLO_PLAIN.to_vec(),
        vec![
            Expect("MAIL FROM:"),
            Send(&["250 Ok\r\n"]),
            Expect("RCPT TO:"),
            Send(&["250 Ok\r\n"]),
            Expect("DATA"),
            Send(&["354 go\r\n"]),
            Data,
            Hang(2000),
        ],
    ]);
    let (port, _) = server(vec![conn]).await;
    let p = pool(port, fast());
    let d = p
        .deliver("news@example.com", &msg("Subject: x\r\n\r\nhi\r\n"))
        .await;
    assert_eq!(
        (d.outcome.kind, d.outcome.stage),
        (OutcomeKind::InDoubt, Stage::FinalDot),
        "{:?}",
        d.outcome
    );
}

#[tokio::test]
async fn multi_line_reply_is_joined_and_split_writes_are_reassembled() {
    let conn = vec![
        Send(&["22", "0 sink", ".test ESMTP\r\n"]),
        Expect("EHLO"),
        Send(&["250-sink.test\r\n250-8BIT", "MIME\r\n25", "0 SIZE 1000\r\n"]),
        Expect("MAIL FROM:"),
        Send(&["250 Ok\r\n"]),
        Expect("RCPT TO:"),
        Send(&[
            "550-5.1.1 The email account that you tried to reach does not exist.\r\n",
            "550-5.1.1 Please try\r\n550 5.1.1 double-checking.\r\n",
        ]),
        Expect("RSET"),
        Send(&["250 Ok\r\n"]),
        Expect("MAIL FROM:"),
        Send(&["250 Ok\r\n"]),
        Expect("RCPT TO:"),
        Send(&["250 Ok\r\n"]),
        Expect("DATA"),
        Send(&["35", "4 go\r\n"]),
        Data,
        Send(&["250-2.0.0 queued\r\n", "250 2.0.0 as ABC\r\n"]),
    ];
    let (port, _) = server(vec![conn]).await;
    let p = pool(port, fast());
    let d = p.deliver("news@example.com", &msg("x")).await;
    assert_eq!(
        (d.outcome.kind, d.outcome.code, d.outcome.stage),
        (OutcomeKind::Bounced, 550, Stage::Rcpt)
    );
    assert_eq!(
        d.outcome.text,
        "5.1.1 The email account that you tried to reach does not exist. Please try double-checking."
    );
    let d = p.deliver("news@example.com", &msg("x")).await;
    assert_eq!(
        (d.outcome.kind, d.outcome.text.as_str()),
        (OutcomeKind::Delivered, "2.0.0 queued as ABC")
    );
}

#[tokio::test]
async fn pipelining_and_8bitmime_parameters() {
    let conn = vec![
        GREET,
        Expect("EHLO"),
        Send(&["250-sink.test\r\n250-PIPELINING\r\n250-SMTPUTF8\r\n250 8BITMIME\r\n"]),
        Expect("MAIL FROM:<news@example.com> BODY=8BITMIME SMTPUTF8\r\n"),
        Expect("RCPT TO:<ñandú@example.com>\r\n"),
        Send(&["250 Ok\r\n250 Ok\r\n"]),
        Expect("DATA"),
        Send(&["354 go\r\n"]),
        Data,
        Send(&["250 Ok\r\n"]),
    ];
    let (port, _) = server(vec![conn]).await;
    let p = pool(port, fast());
    let mut m = msg("Subject: café\r\n\r\ncafé\r\n");
    m.envelope_to = "ñandú@example.com".into();
    m.needs_smtputf8 = true;
    let d = p.deliver("news@example.com", &m).await;
    assert_eq!(d.outcome.kind, OutcomeKind::Delivered, "{:?}", d.outcome);
}

#[tokio::test]
async fn missing_extensions_bounce_with_a_clear_reason() {
    // F4 and F5: no 8BITMIME, no SMTPUTF8; nothing is sent for either job. (A single-part
    // text body would be converted to quoted-printable instead: tests/receiver.rs.)
    let conn = vec![
        GREET,
        Expect("EHLO"),
        Send(&["250-sink.test\r\n250 SIZE 1000\r\n"]),
        Hang(500),
    ];
    let (port, seen) = server(vec![conn]).await;
    let p = pool(port, fast());
    let d = p
        .deliver(
            "news@example.com",
            &msg("Subject: x\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n\r\ncafé\r\n--b--\r\n"),
        )
        .await;
    assert_eq!(
        (d.outcome.kind, d.outcome.stage),
        (OutcomeKind::Bounced, Stage::Mail)
    );
    assert!(d.outcome.text.contains("8BITMIME"), "{}", d.outcome.text);
    let mut m = msg("x");
    m.envelope_to = "ñandú@example.com".into();
    m.needs_smtputf8 = true;
    let d = p.deliver("news@example.com", &m).await;
    assert_eq!(
        (d.outcome.kind, d.outcome.stage),
        (OutcomeKind::Bounced, Stage::Mail)
    );
    assert!(d.outcome.text.contains("SMTPUTF8"), "{}", d.outcome.text);
    assert!(!String::from_utf8_lossy(&seen.lock().await[0]).contains("MAIL FROM"));
}

#[tokio::test]
async fn connection_refused_is_deferred_at_connect() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let p = pool(port, fast());
    let d = p.deliver("news@example.com", &msg("x")).await;
    assert_eq!(
        (d.outcome.kind, d.outcome.stage, d.outcome.code),
        (OutcomeKind::Deferred, Stage::Connect, 0)
    );
}

#[tokio::test]
async fn required_tls_without_starttls_never_sends_mail() {
    let conn = vec![
        GREET,
        Expect("EHLO"),
        Send(&["250-sink.test\r\n250 8BITMIME\r\n"]),
        Hang(500),
    ];
    let (port, seen) = server(vec![conn]).await;
    let relay = Relay {
        host: "127.0.0.1".into(),
        port,
        tls: TlsMode::Required,
        auth: Some(protocol::Auth {
            username: "u".into(),
            password: "secret".into(),
        }),
        helo: "worker.test".into(),
        ca_file: None,
        insecure_skip_verify: true,
    };
    let p = Pool::new(relay, fast(), 1).unwrap();
    let d = p.deliver("news@example.com", &msg("x")).await;
    assert_eq!(
        (d.outcome.kind, d.outcome.stage),
        (OutcomeKind::Deferred, Stage::Ehlo),
        "{:?}",
        d.outcome
    );
    let text = String::from_utf8_lossy(&seen.lock().await[0]).to_string();
    assert!(!text.contains("AUTH") && !text.contains("MAIL"), "{text}");
}

fn tls_pool_relay(port: u16, tls: TlsMode) -> Relay {
    Relay {
        host: "localhost".into(),
        port,
        tls,
        auth: None,
        helo: "worker.test".into(),
        ca_file: None,
        insecure_skip_verify: false,
    }
}

fn tls_pool(port: u16, tls: TlsMode) -> Pool {
    Pool::new(tls_pool_relay(port, tls), fast(), 1).unwrap()
}

const EHLO_TLS: [Step; 2] = [
    Expect("EHLO worker.test"),
    Send(&["250-sink.test\r\n250-STARTTLS\r\n250 8BITMIME\r\n"]),
];

/// The server accepts STARTTLS and then breaks the handshake (F13).
fn broken_starttls() -> Vec<Step> {
    script(vec![
        vec![GREET],
        EHLO_TLS.to_vec(),
        vec![
            Expect("STARTTLS"),
            Send(&["220 ready\r\n", "this is not TLS\r\n"]),
            Hang(300),
        ],
    ])
}

#[tokio::test]
async fn opportunistic_tls_falls_back_to_a_fresh_plain_connection() {
    let plain = script(vec![vec![GREET], EHLO_TLS.to_vec(), ok_transaction()]);
    let (port, seen) = server(vec![broken_starttls(), plain]).await;
    let p = tls_pool(port, TlsMode::Opportunistic);
    let d = p
        .deliver("news@example.com", &msg("Subject: x\r\n\r\nhi\r\n"))
        .await;
    assert_eq!(d.outcome.kind, OutcomeKind::Delivered, "{:?}", d.outcome);
    let seen = seen.lock().await;
    assert_eq!(seen.len(), 2);
    assert!(!String::from_utf8_lossy(&seen[1]).contains("STARTTLS"));
}

#[tokio::test]
async fn required_tls_never_downgrades() {
    let (port, seen) = server(vec![broken_starttls()]).await;
    let p = tls_pool(port, TlsMode::Required);
    let d = p
        .deliver("news@example.com", &msg("Subject: x\r\n\r\nhi\r\n"))
        .await;
    assert_eq!(
        (d.outcome.kind, d.outcome.stage),
        (OutcomeKind::Deferred, Stage::Connect),
        "{:?}",
        d.outcome
    );
    assert!(d.outcome.text.contains("TLS"), "{}", d.outcome.text);
    assert_eq!(
        seen.lock().await.len(),
        1,
        "no plain retry in required mode"
    );
}

#[test]
fn normalising_line_endings_is_idempotent() {
    for input in [
        &b"Hi\n.\nBye\r\na\rb\r\n"[..],
        b"abc\r\n",
        b"abc",
        b"\r\r\n\n",
        b"",
    ] {
        let once = normalize_line_endings(input);
        assert_eq!(normalize_line_endings(&once), once, "{input:?}");
        assert!(once.windows(2).all(|w| w != b"\r\r"), "no CR CR: {once:?}");
    }
    assert_eq!(normalize_line_endings(b"abc\r\n"), b"abc\r\n");
    assert_eq!(normalize_line_endings(b"\r\r\n\n"), b"\r\n\r\n\r\n");
}

fn text_of(seen: &[u8]) -> String {
    String::from_utf8_lossy(seen).into_owned()
}

#[tokio::test]
async fn f9_negative_greeting_quits_and_keeps_the_whole_reply() {
    let (port, seen) = server(vec![
        vec![Send(&["421 4.7.0 Try again later\r\n"])],
        vec![
            Send(&["554-5.7.1 not allowed\r\n", "554 5.7.1 go away\r\n"]),
            Expect("QUIT"),
            Send(&["221 bye\r\n"]),
        ],
    ])
    .await;
    let p = pool(port, fast());
    let d = p.deliver("news@example.com", &msg("x")).await.outcome;
    assert_eq!(
        (
            d.kind,
            d.stage,
            d.code,
            d.enhanced.as_deref(),
            d.text.as_str()
        ),
        (
            OutcomeKind::Deferred,
            Stage::Greeting,
            421,
            Some("4.7.0"),
            "4.7.0 Try again later"
        )
    );
    let d = p.deliver("news@example.com", &msg("x")).await.outcome;
    assert_eq!(
        (
            d.kind,
            d.stage,
            d.code,
            d.enhanced.as_deref(),
            d.text.as_str()
        ),
        (
            OutcomeKind::Bounced,
            Stage::Greeting,
            554,
            Some("5.7.1"),
            "5.7.1 not allowed go away"
        )
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    let seen = seen.lock().await;
    assert_eq!(text_of(&seen[1]), "QUIT\r\n", "QUIT and nothing else");
}

/// Runs one job against a connection whose script ends in `fail`, then a second job that must
/// go over a fresh connection.
async fn fails_then_fresh(fail: Vec<Step>, t: Timeouts) -> (Classified, Vec<Vec<u8>>) {
    let second = script(vec![vec![GREET], EHLO_PLAIN.to_vec(), ok_transaction()]);
    let (port, seen) = server(vec![fail, second]).await;
    let p = pool(port, t);
    let start = std::time::Instant::now();
    let d = p
        .deliver("news@example.com", &msg("Subject: x\r\n\r\nhi\r\n"))
        .await;
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    let d2 = p
        .deliver("news@example.com", &msg("Subject: x\r\n\r\nhi\r\n"))
        .await;
    assert_eq!(d2.outcome.kind, OutcomeKind::Delivered, "{:?}", d2.outcome);
    let seen = seen.lock().await.clone();
    assert_eq!(seen.len(), 2, "the second job used a fresh connection");
    (d.outcome, seen)
}

#[tokio::test]
async fn f10_421_at_any_stage_defers_and_closes_the_connection() {
    let upto = |stage: Stage| -> Vec<Step> {
        let mut v = vec![GREET, Expect("EHLO")];
        let reply_421 = Send(&["421-4.4.2 closing\r\n", "421 4.4.2 connection\r\n"]);
        if stage == Stage::Ehlo {
            v.push(reply_421);
            return v;
        }
        v.push(EHLO_PLAIN[1].clone());
        for (st, cmd, ok) in [
            (Stage::Mail, "MAIL FROM:", "250 Ok\r\n"),
            (Stage::Rcpt, "RCPT TO:", "250 Ok\r\n"),
            (Stage::Data, "DATA", "354 go\r\n"),
        ] {
            v.push(Expect(cmd));
            if st == stage {
                v.push(reply_421);
                return v;
            }
            v.push(Send(match ok {
                "250 Ok\r\n" => &["250 Ok\r\n"],
                _ => &["354 go\r\n"],
            }));
        }
        v.push(Data);
        v.push(reply_421);
        v
    };
    for stage in [
        Stage::Ehlo,
        Stage::Mail,
        Stage::Rcpt,
        Stage::Data,
        Stage::FinalDot,
    ] {
        let (o, seen) = fails_then_fresh(upto(stage), fast()).await;
        assert_eq!(
            (o.kind, o.stage, o.code, o.text.as_str(), o.reusable),
            (
                OutcomeKind::Deferred,
                stage,
                421,
                "4.4.2 closing connection",
                false
            ),
            "421 at {stage:?}"
        );
        let first = text_of(&seen[0]);
        assert!(!first.contains("RSET"), "{stage:?}: {first}");
    }
}

#[tokio::test]
async fn f11_every_stage_has_a_deadline() {
    let t = Timeouts {
        ehlo_ms: 300,
        mail_ms: 300,
        rcpt_ms: 300,
        data_ms: 300,
        ..fast()
    };
    let cases: Vec<(Stage, Vec<Step>)> = vec![
        (Stage::Greeting, vec![Hang(2000)]),
        (Stage::Ehlo, vec![GREET, Expect("EHLO"), Hang(2000)]),
        (
            Stage::Mail,
            script(vec![
                vec![GREET],
                EHLO_PLAIN.to_vec(),
                vec![Expect("MAIL"), Hang(2000)],
            ]),
        ),
        (
            Stage::Rcpt,
            script(vec![
                vec![GREET],
                EHLO_PLAIN.to_vec(),
                vec![
                    Expect("MAIL"),
                    Send(&["250 Ok\r\n"]),
                    Expect("RCPT"),
                    Hang(2000),
                ],
            ]),
        ),
        (
            Stage::Data,
            script(vec![
                vec![GREET],
                EHLO_PLAIN.to_vec(),
                vec![
                    Expect("MAIL"),
                    Send(&["250 Ok\r\n"]),
                    Expect("RCPT"),
                    Send(&["250 Ok\r\n"]),
                    Expect("DATA"),
                    Hang(2000),
                ],
            ]),
        ),
    ];
    for (stage, steps) in cases {
        let (o, _) = fails_then_fresh(steps, t.clone()).await;
        assert_eq!(
            (o.kind, o.stage, o.code, o.reusable),
            (OutcomeKind::Deferred, stage, 0, false),
            "{o:?}"
        );
        assert!(o.text.starts_with("timed out at"), "{}", o.text);
    }
}

#[tokio::test]
async fn f11_timeout_after_the_final_dot_is_in_doubt_not_failed() {
    // The server would answer after 45 s; the deadline here is 300 ms.
    let steps = script(vec![
        vec![GREET],
        EHLO_PLAIN.to_vec(),
        vec![
            Expect("MAIL"),
            Send(&["250 Ok\r\n"]),
            Expect("RCPT"),
            Send(&["250 Ok\r\n"]),
            Expect("DATA"),
            Send(&["354 go\r\n"]),
            Data,
            Hang(2000),
        ],
    ]);
    let (o, _) = fails_then_fresh(steps, fast()).await;
    assert_eq!(
        (o.kind, o.stage, o.code, o.reusable),
        (OutcomeKind::InDoubt, Stage::FinalDot, 0, false)
    );
    assert_eq!(
        o.text,
        "timed out waiting for the reply after the final dot; the message may have been delivered"
    );
}

#[tokio::test]
async fn f11_server_that_stops_reading_mid_data() {
    let steps = script(vec![
        vec![GREET],
        EHLO_PLAIN.to_vec(),
        vec![
            Expect("MAIL"),
            Send(&["250 Ok\r\n"]),
            Expect("RCPT"),
            Send(&["250 Ok\r\n"]),
            Expect("DATA"),
            Send(&["354 go\r\n"]),
            // Never reads the message: the client's writes block once the buffers are full.
            Hang(10_000),
        ],
    ]);
    let (port, seen) = server(vec![steps]).await;
    let t = Timeouts {
        data_ms: 500,
        ..fast()
    };
    let p = pool(port, t);
    // Far more than loopback socket buffers hold.
    let line = "y".repeat(990) + "\r\n";
    let m = msg(&format!("Subject: big\r\n\r\n{}", line.repeat(16 * 1024)));
    let start = std::time::Instant::now();
    let o = p.deliver("news@example.com", &m).await.outcome;
    // Bounded by the deadline, not by the server giving up (10 s).
    assert!(
        start.elapsed() < Duration::from_secs(6),
        "{:?}",
        start.elapsed()
    );
    // The final dot was never sent, so nothing can have been delivered: deferred, not in doubt.
    assert_eq!(
        (o.kind, o.stage, o.text.as_str(), o.reusable),
        (
            OutcomeKind::Deferred,
            Stage::Data,
            "timed out at DATA",
            false
        )
    );
    assert_eq!(seen.lock().await.len(), 1);
}

#[tokio::test]
async fn f12_a_refused_rset_means_a_fresh_connection_never_a_nested_mail() {
    let steps = script(vec![
        vec![GREET],
        EHLO_PLAIN.to_vec(),
        vec![
            Expect("MAIL FROM:"),
            Send(&["250 Ok\r\n"]),
            Expect("RCPT TO:"),
            Send(&["450 4.7.0 rate limit\r\n"]),
            Expect("RSET"),
            Send(&["500 5.5.1 what?\r\n"]),
        ],
    ]);
    let (o, seen) = fails_then_fresh(steps, fast()).await;
    assert_eq!(
        (o.kind, o.stage, o.code, o.text.as_str()),
        (OutcomeKind::Deferred, Stage::Rcpt, 450, "4.7.0 rate limit")
    );
    let first = text_of(&seen[0]);
    assert_eq!(first.matches("MAIL FROM").count(), 1, "{first}");
}

#[tokio::test]
async fn f12_pipelined_failure_is_reset_before_the_next_mail() {
    let conn = vec![
        GREET,
        Expect("EHLO"),
        Send(&["250-sink.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n"]),
        Expect("MAIL FROM:"),
        Expect("RCPT TO:"),
        Send(&["450 4.7.1 too much mail\r\n", "503 5.5.1 need MAIL\r\n"]),
        Expect("RSET"),
        Send(&["250 2.0.0 Ok\r\n"]),
        Expect("MAIL FROM:"),
        Expect("RCPT TO:"),
        Send(&["250 Ok\r\n250 Ok\r\n"]),
        Expect("DATA"),
        Send(&["354 go\r\n"]),
        Data,
        Send(&["250 2.0.0 queued\r\n"]),
    ];
    let (port, seen) = server(vec![conn]).await;
    let p = pool(port, fast());
    let o = p.deliver("news@example.com", &msg("x")).await.outcome;
    assert_eq!(
        (o.kind, o.stage, o.code, o.text.as_str()),
        (
            OutcomeKind::Deferred,
            Stage::Mail,
            450,
            "4.7.1 too much mail"
        )
    );
    let o = p.deliver("news@example.com", &msg("x")).await.outcome;
    assert_eq!(o.kind, OutcomeKind::Delivered, "{o:?}");
    let seen = seen.lock().await;
    assert_eq!(seen.len(), 1);
    let t = text_of(&seen[0]);
    let rset = t.find("RSET").unwrap();
    assert!(
        t.rfind("MAIL FROM").unwrap() > rset && t.find("MAIL FROM").unwrap() < rset,
        "{t}"
    );
}

#[tokio::test]
async fn f13_broken_starttls_with_credentials_never_sends_auth_in_clear_text() {
    let plain = vec![
        GREET,
        Expect("EHLO"),
        Send(&["250-sink.test\r\n250-STARTTLS\r\n250 AUTH PLAIN LOGIN\r\n"]),
        Hang(500),
    ];
    let (port, seen) = server(vec![broken_starttls(), plain]).await;
    for tls in [TlsMode::Opportunistic, TlsMode::Required] {
        let relay = Relay {
            auth: Some(protocol::Auth {
                username: "u".into(),
                password: "secret".into(),
            }),
            ..tls_pool_relay(port, tls)
        };
        let p = Pool::new(relay, fast(), 1).unwrap();
        let o = p.deliver("news@example.com", &msg("x")).await.outcome;
        assert_eq!(o.kind, OutcomeKind::Deferred, "{tls:?}: {o:?}");
        if tls == TlsMode::Opportunistic {
            assert_eq!(
                (o.stage, o.text.as_str()),
                (
                    Stage::Ehlo,
                    "AUTH failed: refusing to send AUTH over a connection without TLS"
                )
            );
        }
    }
    let seen = seen.lock().await;
    for conn in seen.iter() {
        let t = text_of(conn);
        assert!(!t.contains("AUTH") && !t.contains("MAIL"), "{t}");
    }
}

#[tokio::test]
async fn f14_throttling_replies_are_deferred_once_never_bounced() {
    let (port, seen) = server(vec![
        vec![Send(&["421 4.3.2 Too many connections\r\n"])],
        script(vec![
            vec![GREET],
            EHLO_PLAIN.to_vec(),
            vec![
                Expect("MAIL FROM:"),
                Send(&["450 4.7.1 too much mail\r\n"]),
                Hang(500),
            ],
        ]),
        // A third connection would mean the worker retried by itself.
        vec![GREET, Hang(500)],
    ])
    .await;
    let p = pool(port, fast());
    let o = p.deliver("news@example.com", &msg("x")).await.outcome;
    assert_eq!(
        (
            o.kind,
            o.stage,
            o.code,
            o.enhanced.as_deref(),
            o.text.as_str()
        ),
        (
            OutcomeKind::Deferred,
            Stage::Greeting,
            421,
            Some("4.3.2"),
            "4.3.2 Too many connections"
        )
    );
    let o = p.deliver("news@example.com", &msg("x")).await.outcome;
    assert_eq!(
        (
            o.kind,
            o.stage,
            o.code,
            o.enhanced.as_deref(),
            o.text.as_str()
        ),
        (
            OutcomeKind::Deferred,
            Stage::Mail,
            450,
            Some("4.7.1"),
            "4.7.1 too much mail"
        )
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    let seen = seen.lock().await;
    assert_eq!(
        seen.len(),
        2,
        "one connection per attempt, no retry loop in the worker"
    );
    assert_eq!(text_of(&seen[1]).matches("MAIL FROM").count(), 1);
}
