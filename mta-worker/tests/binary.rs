//! Spawns the real `mta-worker` binary the way the governor does (socketpair on fd 3), and
//! drives it through the handshake, a campaign and a job delivered to a scripted SMTP server.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
use protocol::{
    CampaignSpec, Job, OutcomeKind, PROTOCOL_VERSION, Relay, Stage, Timeouts, TlsMode, ToGovernor,
    ToWorker, Welcome, read_frame, write_frame,
};

/// Starts the worker with `child_end` as its fd 3.
fn spawn_worker() -> (Child, UnixStream) {
    let (ours, theirs): (OwnedFd, OwnedFd) = socketpair(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .unwrap();
    let raw = theirs.as_raw_fd();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mta-worker"));
    cmd.stdin(Stdio::null()).stderr(Stdio::piped());
    // SAFETY: only async-signal-safe calls (dup2) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            // dup2 clears FD_CLOEXEC on the new descriptor, so fd 3 survives exec.
            nix::unistd::dup2(raw, 3).map_err(std::io::Error::from)?;
            Ok(())
        });
    }
    let child = cmd.spawn().unwrap();
    drop(theirs);
    (child, UnixStream::from(ours))
}

fn wait_exit(child: &mut Child, within: Duration) -> ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        if start.elapsed() > within {
            let _ = child.kill();
            panic!("worker did not exit within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A minimal SMTP sink answering every command positively; sends each message's DATA bytes.
fn sink() -> (u16, mpsc::Receiver<Vec<u8>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for sock in listener.incoming() {
            let Ok(mut sock) = sock else { return };
            let tx = tx.clone();
            std::thread::spawn(move || {
                let mut rd = BufReader::new(sock.try_clone().unwrap());
                sock.write_all(b"220 sink ESMTP\r\n").unwrap();
                let mut line = Vec::new();
                loop {
                    line.clear();
                    if rd.read_until(b'\n', &mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    let cmd = String::from_utf8_lossy(&line).to_ascii_uppercase();
                    let reply: &[u8] = if cmd.starts_with("EHLO") {
                        b"250-sink\r\n250-PIPELINING\r\n250 8BITMIME\r\n"
                    } else if cmd.starts_with("DATA") {
                        sock.write_all(b"354 go\r\n").unwrap();
                        let mut data = Vec::new();
                        loop {
                            let mut l = Vec::new();
                            if rd.read_until(b'\n', &mut l).unwrap_or(0) == 0 {
                                return;
                            }
                            if l == b".\r\n" {
                                break;
                            }
                            data.extend_from_slice(&l);
                        }
                        let _ = tx.send(data);
                        b"250 2.0.0 Ok: queued as 42\r\n"
                    } else if cmd.starts_with("QUIT") {
                        let _ = sock.write_all(b"221 bye\r\n");
                        return;
                    } else {
                        b"250 2.0.0 Ok\r\n"
                    };
                    if sock.write_all(reply).is_err() {
                        return;
                    }
                }
            });
        }
    });
    (port, rx)
}

fn welcome(port: u16, log_path: &str) -> Welcome {
    Welcome {
        slot: 4,
        log_path: log_path.into(),
        sessions: 2,
        relay: Relay {
            host: "127.0.0.1".into(),
            port,
            tls: TlsMode::Off,
            auth: None,
            helo: "worker.test".into(),
            ca_file: None,
            insecure_skip_verify: false,
        },
        timeouts: Timeouts {
            greeting_ms: 2000,
            final_dot_ms: 2000,
            ..Timeouts::default()
        },
        dkim: None,
    }
}

fn handshake(sock: &mut UnixStream) -> u32 {
    match read_frame::<_, ToGovernor>(sock).unwrap() {
        ToGovernor::Hello { version, pid } => {
            assert_eq!(version, PROTOCOL_VERSION);
            pid
        }
        other => panic!("expected Hello, got {other:?}"),
    }
}

fn log_path(name: &str) -> String {
    let p = std::env::temp_dir().join(format!("mta-worker-{name}-{}.log", std::process::id()));
    let _ = std::fs::remove_file(&p);
    p.to_string_lossy().into_owned()
}

#[test]
fn delivers_a_job_and_drains() {
    let (port, messages) = sink();
    let (mut child, mut sock) = spawn_worker();
    let pid = handshake(&mut sock);
    let log = log_path("deliver");
    write_frame(&mut sock, &ToWorker::Welcome(welcome(port, &log))).unwrap();
    let template = "From: news@example.com\nTo: \"{{ name }}\" <{{ email }}>\nSubject: Hi {{ name }}\n\nHello {{ name }}\n.dot line\n";
    write_frame(
        &mut sock,
        &ToWorker::Campaign(CampaignSpec {
            campaign_id: 11,
            name: "spring".into(),
            template: template.into(),
            sender: "news@example.com".into(),
            fields: vec!["email".into(), "name".into()],
        }),
    )
    .unwrap();
    let job = |job_id, lease_id, campaign_id, recipient: &str| Job {
        job_id,
        lease_id,
        campaign_id,
        attempt: 1,
        recipient: recipient.into(),
        values: vec![recipient.into(), "Doe, Jane".into()],
        message_id: format!("job-{job_id}@example.com"),
    };
    write_frame(
        &mut sock,
        &ToWorker::Job(job(1, 100, 11, "jane@example.com")),
    )
    .unwrap();
    write_frame(&mut sock, &ToWorker::Job(job(2, 200, 99, "x@example.com"))).unwrap();
    write_frame(&mut sock, &ToWorker::Job(job(3, 300, 11, "not-an-address"))).unwrap();

    let mut outcomes = Vec::new();
    for _ in 0..3 {
        match read_frame::<_, ToGovernor>(&mut sock).unwrap() {
            ToGovernor::Outcome(o) => outcomes.push(o),
            other => panic!("expected Outcome, got {other:?}"),
        }
    }
    outcomes.sort_by_key(|o| o.job_id);
    let o = &outcomes[0];
    assert_eq!(
        (o.lease_id, o.kind, o.code, o.stage),
        (100, OutcomeKind::Delivered, 250, Stage::FinalDot),
        "{o:?}"
    );
    assert_eq!(o.text, "2.0.0 Ok: queued as 42");
    let o = &outcomes[1];
    assert_eq!(
        (o.lease_id, o.kind, o.stage, o.code),
        (200, OutcomeKind::Bounced, Stage::Render, 0),
        "{o:?}"
    );
    assert!(o.text.contains("campaign 99"), "{}", o.text);
    let o = &outcomes[2];
    assert_eq!(
        (o.lease_id, o.kind, o.stage),
        (300, OutcomeKind::Bounced, Stage::Render),
        "{o:?}"
    );

    let data = String::from_utf8(messages.recv_timeout(Duration::from_secs(5)).unwrap()).unwrap();
    assert!(
        data.contains("To: \"Doe, Jane\" <jane@example.com>\r\n"),
        "{data}"
    );
    assert!(
        data.contains("Message-ID: <job-1@example.com>\r\n"),
        "{data}"
    );
    assert!(
        data.ends_with("\r\n\r\nHello Doe, Jane\r\n..dot line\r\n"),
        "{data:?}"
    );

    write_frame(&mut sock, &ToWorker::Drain).unwrap();
    let status = wait_exit(&mut child, Duration::from_secs(10));
    assert!(status.success(), "{status:?}");
    let log_text = std::fs::read_to_string(&log).unwrap();
    assert!(
        log_text.contains(&format!("pid={pid} slot=4")),
        "{log_text}"
    );
    assert!(
        log_text.contains("session=") && log_text.contains("job=1 "),
        "{log_text}"
    );
    let _ = std::fs::remove_file(&log);
}

#[test]
fn reject_exits_non_zero() {
    let (mut child, mut sock) = spawn_worker();
    handshake(&mut sock);
    write_frame(
        &mut sock,
        &ToWorker::Reject {
            reason: "worker speaks protocol 9".into(),
        },
    )
    .unwrap();
    let status = wait_exit(&mut child, Duration::from_secs(5));
    assert!(!status.success());
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(err.contains("protocol 9"), "{err}");
}

#[test]
fn undecodable_frame_exits_non_zero_and_eof_exits_zero() {
    let (port, _messages) = sink();
    let (mut child, mut sock) = spawn_worker();
    handshake(&mut sock);
    let log = log_path("garbage");
    write_frame(&mut sock, &ToWorker::Welcome(welcome(port, &log))).unwrap();
    // A frame whose payload is no known message.
    sock.write_all(&[0, 0, 0, 3, 0xff, 0xff, 0xff]).unwrap();
    let status = wait_exit(&mut child, Duration::from_secs(5));
    assert!(!status.success(), "{status:?}");

    let (mut child, mut sock) = spawn_worker();
    handshake(&mut sock);
    write_frame(&mut sock, &ToWorker::Welcome(welcome(port, &log))).unwrap();
    drop(sock);
    let status = wait_exit(&mut child, Duration::from_secs(5));
    assert!(status.success(), "{status:?}");
    let _ = std::fs::remove_file(&log);
}

#[test]
fn refuses_to_run_without_the_ipc_socket() {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mta-worker"));
    // SAFETY: close(2) is async-signal-safe; make sure fd 3 is not inherited from the harness.
    unsafe {
        cmd.pre_exec(|| {
            let _ = nix::unistd::close(3);
            Ok(())
        });
    }
    let out = cmd.stdin(Stdio::null()).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("must be started by the governor"));
}

const ED25519_PEM: &str = "-----BEGIN PRIVATE KEY-----\n\
    MC4CAQAwBQYDK2VwBCIEINTuctv5E1hK1bbY8fdp+K06/nwoy/HU++CXqI9EdVhC\n\
    -----END PRIVATE KEY-----\n";

fn dkim(pem: &str) -> Option<protocol::Dkim> {
    Some(protocol::Dkim {
        domain: "example.com".into(),
        selector: "s1".into(),
        algorithm: protocol::DkimAlgorithm::Ed25519Sha256,
        private_key_pem: pem.into(),
    })
}

#[test]
fn dkim_from_the_welcome_signs_every_message() {
    let (port, messages) = sink();
    let (mut child, mut sock) = spawn_worker();
    handshake(&mut sock);
    let log = log_path("dkim");
    let mut w = welcome(port, &log);
    w.dkim = dkim(ED25519_PEM);
    write_frame(&mut sock, &ToWorker::Welcome(w)).unwrap();
    write_frame(
        &mut sock,
        &ToWorker::Campaign(CampaignSpec {
            campaign_id: 1,
            name: "signed".into(),
            template: "From: news@example.com\nTo: {{ email }}\nSubject: hi\n\nhello\n".into(),
            sender: "news@example.com".into(),
            fields: vec!["email".into()],
        }),
    )
    .unwrap();
    write_frame(
        &mut sock,
        &ToWorker::Job(Job {
            job_id: 1,
            lease_id: 1,
            campaign_id: 1,
            attempt: 1,
            recipient: "a@example.com".into(),
            values: vec!["a@example.com".into()],
            message_id: "m@example.com".into(),
        }),
    )
    .unwrap();
    match read_frame::<_, ToGovernor>(&mut sock).unwrap() {
        ToGovernor::Outcome(o) => assert_eq!(o.kind, OutcomeKind::Delivered, "{o:?}"),
        other => panic!("expected Outcome, got {other:?}"),
    }
    let data = String::from_utf8(messages.recv_timeout(Duration::from_secs(5)).unwrap()).unwrap();
    assert!(
        data.starts_with(
            "DKIM-Signature: v=1; a=ed25519-sha256; s=s1; d=example.com; c=relaxed/relaxed;"
        ),
        "{data}"
    );
    write_frame(&mut sock, &ToWorker::Drain).unwrap();
    assert!(wait_exit(&mut child, Duration::from_secs(10)).success());
    let log_text = std::fs::read_to_string(&log).unwrap();
    assert!(
        log_text.contains("dkim signing domain=example.com selector=s1"),
        "{log_text}"
    );
    assert!(
        !log_text.contains("MC4CAQAw"),
        "the key was logged: {log_text}"
    );
    let _ = std::fs::remove_file(&log);
}

#[test]
fn unusable_dkim_key_exits_non_zero_without_showing_it() {
    let (port, _messages) = sink();
    let (mut child, mut sock) = spawn_worker();
    handshake(&mut sock);
    let log = log_path("dkim-bad");
    let mut w = welcome(port, &log);
    w.dkim = dkim("-----BEGIN PRIVATE KEY-----\nU0VDUkVU\n-----END PRIVATE KEY-----\n");
    write_frame(&mut sock, &ToWorker::Welcome(w)).unwrap();
    let status = wait_exit(&mut child, Duration::from_secs(5));
    assert!(!status.success(), "{status:?}");
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(
        err.contains("DKIM private key for selector \"s1\" of example.com"),
        "{err}"
    );
    assert!(!err.contains("U0VDUkVU"), "{err}");
    let _ = std::fs::remove_file(&log);
}
