//! Golden bytes and backward compatibility: the encoding of each message is pinned, and the
//! fixture under `tests/fixtures` (written by an earlier build) must still decode.

use super::*;

fn hello() -> ToGovernor {
    ToGovernor::Hello {
        version: 1,
        pid: 4242,
    }
}

fn job() -> ToWorker {
    ToWorker::Job(Job {
        job_id: 7,
        lease_id: 9,
        campaign_id: 1,
        attempt: 1,
        recipient: "a@b.c".into(),
        values: vec!["Al".into()],
        message_id: "m@x".into(),
    })
}

fn outcome() -> ToGovernor {
    ToGovernor::Outcome(JobOutcome {
        job_id: 7,
        lease_id: 9,
        kind: OutcomeKind::Deferred,
        code: 451,
        enhanced: Some("4.7.1".into()),
        text: "try later".into(),
        stage: Stage::Rcpt,
        latency_ms: 300,
        session: 2,
    })
}

#[test]
fn hello_golden_bytes() {
    // variant 0, version 1, pid 4242 as a varint (0x92 0x21)
    assert_eq!(
        encode(&hello()).unwrap(),
        vec![0, 0, 0, 4, 0, 1, 0x92, 0x21]
    );
}

#[test]
fn job_golden_bytes() {
    let bytes = encode(&job()).unwrap();
    let expect: Vec<u8> = vec![
        0, 0, 0, 19, // length
        3,  // variant Job
        7, 9, 1, 1, // ids and attempt
        5, b'a', b'@', b'b', b'.', b'c', // recipient
        1, 2, b'A', b'l', // values
        3, b'm', b'@', b'x', // message id
    ];
    assert_eq!(bytes, expect);
}

#[test]
fn drain_and_shutdown_golden_bytes() {
    assert_eq!(encode(&ToWorker::Drain).unwrap(), vec![0, 0, 0, 1, 4]);
    assert_eq!(encode(&ToWorker::Shutdown).unwrap(), vec![0, 0, 0, 1, 5]);
}

#[test]
fn round_trip_through_a_stream() {
    let mut wire = Vec::new();
    write_frame(&mut wire, &hello()).unwrap();
    write_frame(&mut wire, &outcome()).unwrap();
    let mut r = &wire[..];
    assert_eq!(read_frame::<_, ToGovernor>(&mut r).unwrap(), hello());
    assert_eq!(read_frame::<_, ToGovernor>(&mut r).unwrap(), outcome());
    assert!(matches!(
        read_frame::<_, ToGovernor>(&mut r),
        Err(FrameError::Eof)
    ));
}

#[test]
fn decoder_handles_split_input_byte_by_byte() {
    let mut wire = encode(&job()).unwrap();
    wire.extend(encode(&ToWorker::Drain).unwrap());
    let mut d = FrameDecoder::new();
    let mut got = Vec::new();
    for b in wire {
        d.extend(&[b]);
        while let Some(m) = d.next_message::<ToWorker>().unwrap() {
            got.push(m);
        }
    }
    assert_eq!(got, vec![job(), ToWorker::Drain]);
    assert_eq!(d.pending(), 0);
}

#[test]
fn oversized_prefix_is_refused_before_allocating() {
    let wire = [0xff, 0xff, 0xff, 0xff, 0];
    let err = read_frame::<_, ToGovernor>(&mut &wire[..]).unwrap_err();
    assert!(
        matches!(err, FrameError::TooLarge { len: u32::MAX, .. }),
        "{err}"
    );
    let mut d = FrameDecoder::new();
    d.extend(&wire);
    assert!(matches!(
        d.next_message::<ToGovernor>(),
        Err(FrameError::TooLarge { .. })
    ));
}

#[test]
fn unknown_variant_and_garbage_are_decode_errors() {
    // variant 99 does not exist
    let wire = [0, 0, 0, 1, 99];
    assert!(matches!(
        read_frame::<_, ToGovernor>(&mut &wire[..]),
        Err(FrameError::Decode(_))
    ));
    // trailing garbage after a valid message
    let wire = [0, 0, 0, 2, 4, 4];
    assert!(matches!(
        read_frame::<_, ToWorker>(&mut &wire[..]),
        Err(FrameError::Decode(_))
    ));
}

#[test]
fn truncated_frame_is_an_io_error_not_eof() {
    let wire = [0, 0, 0, 8, 0, 1];
    assert!(matches!(
        read_frame::<_, ToGovernor>(&mut &wire[..]),
        Err(FrameError::Io(_))
    ));
}

#[test]
fn auth_debug_never_shows_the_password() {
    let a = Auth {
        username: "u".into(),
        password: "hunter2".into(),
    };
    assert!(!format!("{a:?}").contains("hunter2"));
}

fn expected_frames(dkim: Option<Dkim>) -> (Vec<ToWorker>, Vec<ToGovernor>) {
    let expect_worker = vec![
        ToWorker::Welcome(Welcome {
            slot: 3,
            log_path: "/var/log/governor/worker-3.log".into(),
            sessions: 4,
            relay: Relay {
                host: "127.0.0.1".into(),
                port: 2525,
                tls: TlsMode::Opportunistic,
                auth: Some(Auth {
                    username: "u".into(),
                    password: "p".into(),
                }),
                helo: "mta.example.com".into(),
                ca_file: None,
                insecure_skip_verify: false,
            },
            timeouts: Timeouts::default(),
            dkim,
        }),
        ToWorker::Campaign(CampaignSpec {
            campaign_id: 1,
            name: "news".into(),
            template: "Subject: hi {{ name }}\n\nbody\n".into(),
            sender: "bounce@example.com".into(),
            fields: vec!["email".into(), "name".into()],
        }),
        job(),
        ToWorker::Drain,
        ToWorker::Shutdown,
        ToWorker::Reject {
            reason: "version".into(),
        },
    ];
    let expect_gov = vec![
        hello(),
        outcome(),
        ToGovernor::Fatal {
            reason: "boom".into(),
        },
    ];
    (expect_worker, expect_gov)
}

fn fixture(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// Frames written by protocol version 2. If this fails, the change broke compatibility:
/// bump [`PROTOCOL_VERSION`] and add a new fixture instead of editing this one.
#[test]
fn v2_fixture_still_decodes() {
    let path = fixture("v2-frames.bin");
    let (expect_worker, expect_gov) = expected_frames(Some(Dkim {
        domain: "example.com".into(),
        selector: "s1".into(),
        algorithm: DkimAlgorithm::Ed25519Sha256,
        private_key_pem: "-----BEGIN PRIVATE KEY-----\nAA==\n-----END PRIVATE KEY-----\n".into(),
    }));
    if std::env::var_os("PROTOCOL_WRITE_FIXTURE").is_some() {
        let mut out = Vec::new();
        for m in &expect_worker {
            write_frame(&mut out, m).unwrap();
        }
        for m in &expect_gov {
            write_frame(&mut out, m).unwrap();
        }
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, out).unwrap();
    }
    let bytes =
        std::fs::read(&path).expect("fixture missing: run once with PROTOCOL_WRITE_FIXTURE=1");
    let mut r = &bytes[..];
    for m in expect_worker {
        assert_eq!(read_frame::<_, ToWorker>(&mut r).unwrap(), m);
    }
    for m in expect_gov {
        assert_eq!(read_frame::<_, ToGovernor>(&mut r).unwrap(), m);
    }
    assert!(r.is_empty());
}

/// Version 2 only appended `Welcome::dkim`: every other frame written by version 1 must still
/// decode, and the v1 Welcome must fail to decode (so the version handshake, not a silent
/// misreading, is what separates the two).
#[test]
fn v1_fixture_frames_other_than_welcome_still_decode() {
    let bytes = std::fs::read(fixture("v1-frames.bin")).unwrap();
    let (expect_worker, expect_gov) = expected_frames(None);
    let mut r = &bytes[..];
    assert!(
        read_frame::<_, ToWorker>(&mut r).is_err(),
        "v1 Welcome decoded as v2"
    );
    // Skip the rest of the v1 Welcome frame by its length prefix.
    let mut r = &bytes[..];
    let len = u32::from_be_bytes([r[0], r[1], r[2], r[3]]) as usize;
    r = &r[4 + len..];
    for m in expect_worker.into_iter().skip(1) {
        assert_eq!(read_frame::<_, ToWorker>(&mut r).unwrap(), m);
    }
    for m in expect_gov {
        assert_eq!(read_frame::<_, ToGovernor>(&mut r).unwrap(), m);
    }
    assert!(r.is_empty());
}

#[test]
fn dkim_debug_never_shows_the_key() {
    let d = Dkim {
        domain: "example.com".into(),
        selector: "s1".into(),
        algorithm: DkimAlgorithm::RsaSha256,
        private_key_pem: "-----BEGIN PRIVATE KEY-----SECRETKEY".into(),
    };
    let s = format!("{d:?}");
    assert!(!s.contains("SECRETKEY") && s.contains("redacted"), "{s}");
}
