//! FAULTS.md F1-F8 and DKIM, checked through a real receiver: aiosmtpd stores the bytes after
//! DATA exactly as it received them (dot-stuffing undone) and the envelope it was given.

mod peers;

use mta_worker::dkim::Signer;
use mta_worker::render::Rendered;
use mta_worker::session::Pool;
use peers::*;
use protocol::{Dkim, DkimAlgorithm, OutcomeKind, Stage, TlsMode};

fn pool(peer: &Peer) -> Pool {
    Pool::new(relay("127.0.0.1", peer.port, TlsMode::Off), timeouts(), 1).unwrap()
}

const FROM_TO: &str = "From: News <news@example.com>\nTo: {{ email }}\n";

#[tokio::test]
async fn f1_dot_lines_arrive_as_written() {
    let Some(peer) = Peer::start("f1", &[]) else {
        return;
    };
    let p = pool(&peer);
    let r = campaign(
        &format!("{FROM_TO}Subject: dots\n\n.test\n.\n..\n{{{{ v }}}}\n...\nend"),
        &["email", "v"],
    );
    let o = send(&p, &r, "a@example.com", &["a@example.com", ".merge\n.\n"]).await;
    assert_eq!(o.kind, OutcomeKind::Delivered, "{o:?}");
    let (m, _) = peer.message(1);
    assert_eq!(
        body(&m),
        b".test\r\n.\r\n..\r\n.merge\r\n.\r\n\r\n...\r\nend\r\n"
    );
    // A body whose first byte is a dot, and a message whose very first byte is one.
    let r = campaign(&format!("{FROM_TO}Subject: first\n\n.first"), &["email"]);
    assert_eq!(
        send(&p, &r, "a@example.com", &["a@example.com"]).await.kind,
        OutcomeKind::Delivered
    );
    assert_eq!(body(&peer.message(2).0), b".first\r\n");
    let raw = Rendered {
        bytes: b".X-Odd: header line\r\n\r\n.\r\n".to_vec(),
        envelope_to: "a@example.com".into(),
        needs_smtputf8: false,
        eight_bit: false,
    };
    let o = p.deliver("news@example.com", &raw).await.outcome;
    assert_eq!(o.kind, OutcomeKind::Delivered, "{o:?}");
    assert_eq!(peer.message(3).0, b".X-Odd: header line\r\n\r\n.\r\n");
}

#[tokio::test]
async fn f2_bare_line_endings_never_reach_the_wire() {
    let Some(peer) = Peer::start("f2", &[]) else {
        return;
    };
    let p = pool(&peer);
    let r = campaign(
        &format!("{FROM_TO}Subject: eol\n\n{{{{ v }}}}"),
        &["email", "v"],
    );
    let o = send(
        &p,
        &r,
        "a@example.com",
        &["a@example.com", "Hi\n.\nBye\r\na\rb\r\nabc\r\n"],
    )
    .await;
    assert_eq!(o.kind, OutcomeKind::Delivered, "{o:?}");
    let (m, _) = peer.message(1);
    assert_clean(&m);
    // The dot after a bare LF is a line of its own, and did not end DATA early.
    assert_eq!(body(&m), b"Hi\r\n.\r\nBye\r\na\r\nb\r\nabc\r\n");
    // A message handed to the session with bare endings (not from the renderer).
    let raw = Rendered {
        bytes: b"Subject: raw\nX-A: b\r\n\r\nHi\n.\nBye\r\na\rb\r\nabc\r\n\r".to_vec(),
        envelope_to: "a@example.com".into(),
        needs_smtputf8: false,
        eight_bit: false,
    };
    let o = p.deliver("news@example.com", &raw).await.outcome;
    assert_eq!(o.kind, OutcomeKind::Delivered, "{o:?}");
    assert_eq!(
        peer.message(2).0,
        b"Subject: raw\r\nX-A: b\r\n\r\nHi\r\n.\r\nBye\r\na\r\nb\r\nabc\r\n\r\n"
    );
}

#[tokio::test]
async fn f3_no_line_over_998_octets() {
    let Some(peer) = Peer::start("f3", &[]) else {
        return;
    };
    let p = pool(&peer);
    // A merge value making a body line of 1500 octets, and a header value of 2000.
    let long = "x".repeat(1500);
    let words = "word ".repeat(400);
    let r = campaign(
        &format!(
            "{FROM_TO}Subject: {{{{ s }}}}\nContent-Type: text/plain; charset=utf-8\n\nA{{{{ v }}}}B\nshort\n"
        ),
        &["email", "s", "v"],
    );
    let o = send(&p, &r, "a@example.com", &["a@example.com", &words, &long]).await;
    assert_eq!(o.kind, OutcomeKind::Delivered, "{o:?}");
    let (m, _) = peer.message(1);
    assert_clean(&m);
    assert_eq!(
        header(&m, "Content-Transfer-Encoding").as_deref(),
        Some("quoted-printable")
    );
    assert_eq!(
        qp_decode(body(&m)),
        format!("A{long}B\r\nshort\r\n").into_bytes()
    );
    assert_eq!(header(&m, "Subject").unwrap(), words.trim_end());
    // A template line of 1001 octets with no merge field at all.
    let r = campaign(
        &format!("{FROM_TO}Subject: t\n\n{}\n", "y".repeat(1001)),
        &["email"],
    );
    assert_eq!(
        send(&p, &r, "a@example.com", &["a@example.com"]).await.kind,
        OutcomeKind::Delivered
    );
    let (m, _) = peer.message(2);
    assert_clean(&m);
    assert_eq!(
        qp_decode(body(&m)),
        format!("{}\r\n", "y".repeat(1001)).into_bytes()
    );
    // The session refuses a message that still has a long line (e.g. a raw one) instead of
    // sending it.
    let raw = Rendered {
        bytes: format!("Subject: raw\r\n\r\n{}\r\n", "z".repeat(999)).into_bytes(),
        envelope_to: "a@example.com".into(),
        needs_smtputf8: false,
        eight_bit: false,
    };
    let o = p.deliver("news@example.com", &raw).await.outcome;
    assert_eq!(
        (o.kind, o.stage, o.text.as_str()),
        (
            OutcomeKind::Bounced,
            Stage::Mail,
            "message not sent: the message has a line of 999 octets, more than the 998 SMTP allows"
        )
    );
    assert_eq!(peer.count(), 2);
}

#[tokio::test]
async fn f4_eight_bit_goes_as_8bitmime_only_when_offered() {
    let Some(peer) = Peer::start("f4-8bit", &[]) else {
        return;
    };
    let p = pool(&peer);
    let r = campaign(
        &format!(
            "{FROM_TO}Subject: café\nContent-Type: text/plain; charset=utf-8\n\nUn café, {{{{ name }}}}!\n"
        ),
        &["email", "name"],
    );
    let o = send(&p, &r, "a@example.com", &["a@example.com", "Zoë"]).await;
    assert_eq!(o.kind, OutcomeKind::Delivered, "{o:?}");
    let (m, meta) = peer.message(1);
    assert_eq!(meta["mail_options"], serde_json::json!(["BODY=8BITMIME"]));
    assert_eq!(body(&m), "Un café, Zoë!\r\n".as_bytes());
}

#[tokio::test]
async fn f4_without_8bitmime_the_message_is_made_7bit_clean() {
    let Some(peer) = Peer::start("f4-7bit", &["--no-8bitmime"]) else {
        return;
    };
    let p = pool(&peer);
    let r = campaign(
        &format!("{FROM_TO}Subject: café crème\n\nUn café, {{{{ name }}}}!\n"),
        &["email", "name"],
    );
    let o = send(&p, &r, "a@example.com", &["a@example.com", "Zoë"]).await;
    assert_eq!(o.kind, OutcomeKind::Delivered, "{o:?}");
    let (m, meta) = peer.message(1);
    assert_eq!(
        meta["mail_options"],
        serde_json::json!([]),
        "no BODY=8BITMIME"
    );
    assert!(m.is_ascii(), "{}", String::from_utf8_lossy(&m));
    assert_clean(&m);
    assert_eq!(
        header(&m, "Subject").as_deref(),
        Some("=?UTF-8?B?Y2Fmw6kgY3LDqG1l?=")
    );
    assert_eq!(
        header(&m, "Content-Type").as_deref(),
        Some("text/plain; charset=utf-8")
    );
    assert_eq!(
        header(&m, "Content-Transfer-Encoding").as_deref(),
        Some("quoted-printable")
    );
    assert_eq!(header(&m, "MIME-Version").as_deref(), Some("1.0"));
    assert_eq!(body(&m), b"Un caf=C3=A9, Zo=C3=AB!\r\n");

    // What cannot be converted (a multipart body with an 8-bit part) fails that job clearly,
    // sends nothing, and leaves the connection usable.
    let r = campaign(
        &format!(
            "{FROM_TO}Subject: mp\nMIME-Version: 1.0\nContent-Type: multipart/alternative; boundary=\"b\"\n\n--b\nContent-Type: text/plain; charset=utf-8\n\ncafé\n--b--\n"
        ),
        &["email"],
    );
    let o = send(&p, &r, "a@example.com", &["a@example.com"]).await;
    assert_eq!(
        (o.kind, o.stage),
        (OutcomeKind::Bounced, Stage::Mail),
        "{o:?}"
    );
    assert_eq!(
        o.text,
        "message contains 8-bit data and the server does not offer 8BITMIME; it cannot be \
         converted to 7 bits: the multipart body contains 8-bit data and the server does not \
         offer 8BITMIME; encode its parts (quoted-printable or base64) in the template"
    );
    let r = campaign(&format!("{FROM_TO}Subject: ok\n\nfine\n"), &["email"]);
    assert_eq!(
        send(&p, &r, "a@example.com", &["a@example.com"]).await.kind,
        OutcomeKind::Delivered
    );
    assert_eq!(peer.count(), 2);
}

#[tokio::test]
async fn f5_idn_domains_go_as_a_labels_and_utf8_local_parts_need_smtputf8() {
    let Some(plain) = Peer::start("f5", &[]) else {
        return;
    };
    let p = pool(&plain);
    let r = campaign(&format!("{FROM_TO}Subject: idn\n\nhi\n"), &["email"]);
    let o = send(&p, &r, "user@bücher.example", &["user@bücher.example"]).await;
    assert_eq!(o.kind, OutcomeKind::Delivered, "{o:?}");
    let (m, meta) = plain.message(1);
    assert_eq!(
        meta["rcpt_tos"],
        serde_json::json!(["user@xn--bcher-kva.example"])
    );
    assert_eq!(
        header(&m, "To").as_deref(),
        Some("user@xn--bcher-kva.example")
    );

    let o = send(&p, &r, "ñandú@example.com", &["ñandú@example.com"]).await;
    assert_eq!(
        (o.kind, o.stage),
        (OutcomeKind::Bounced, Stage::Mail),
        "{o:?}"
    );
    assert_eq!(
        o.text,
        "recipient ñandú@example.com needs SMTPUTF8 (non-ASCII local part) and the server does \
         not offer it"
    );
    assert_eq!(plain.count(), 1, "nothing sent for the refused recipient");

    let utf8 = Peer::start("f5-utf8", &["--smtputf8"]).unwrap();
    let p = pool(&utf8);
    let o = send(&p, &r, "ñandú@example.com", &["ñandú@example.com"]).await;
    assert_eq!(o.kind, OutcomeKind::Delivered, "{o:?}");
    let (_, meta) = utf8.message(1);
    assert_eq!(meta["rcpt_tos"], serde_json::json!(["ñandú@example.com"]));
    assert!(
        meta["mail_options"]
            .as_array()
            .unwrap()
            .contains(&serde_json::json!("SMTPUTF8")),
        "{meta}"
    );
}

#[tokio::test]
async fn f6_merge_values_never_add_header_fields() {
    let Some(peer) = Peer::start("f6", &[]) else {
        return;
    };
    let p = pool(&peer);
    let r = campaign(
        "From: news@example.com\nTo: {{ name }} <{{ email }}>\nSubject: Hello {{ name }}\n\nHi {{ name }}\n",
        &["email", "name"],
    );
    let hostile = [
        "Alice\r\nBcc: someone@example.net",
        "Alice\nBcc: someone@example.net",
        "Alice\rCc: someone@example.net",
        "Alice\r\n\r\nInjected body",
        "Alice\r\n To: continued@example.net",
    ];
    for (i, name) in hostile.iter().enumerate() {
        let o = send(&p, &r, "alice@example.com", &["alice@example.com", name]).await;
        assert_eq!(o.kind, OutcomeKind::Delivered, "{name:?}: {o:?}");
        let (m, meta) = peer.message(i + 1);
        assert_clean(&m);
        assert_eq!(
            header_names(&m),
            ["from", "to", "subject", "message-id"],
            "{name:?}: {}",
            String::from_utf8_lossy(&m)
        );
        assert_eq!(meta["rcpt_tos"], serde_json::json!(["alice@example.com"]));
        let to = header(&m, "To").unwrap();
        // One mailbox: the hostile text is at most part of its (quoted) display name.
        assert!(to.ends_with("<alice@example.com>"), "{to}");
        assert_eq!(to.matches('<').count(), 1, "{to}");
    }
}

#[tokio::test]
async fn f7_display_names_are_quoted_or_encoded() {
    let Some(peer) = Peer::start("f7", &[]) else {
        return;
    };
    let p = pool(&peer);
    let r = campaign(
        "From: news@example.com\nTo: {{ name }} <{{ email }}>\nSubject: x\n\nhi\n",
        &["email", "name"],
    );
    let cases = [
        ("Doe, Jane", r#""Doe, Jane" <jane@example.com>"#),
        (
            "Support (Billing)",
            r#""Support (Billing)" <jane@example.com>"#,
        ),
        (
            r#"Jane "JJ" \ Doe"#,
            r#""Jane \"JJ\" \\ Doe" <jane@example.com>"#,
        ),
        (
            "Zoë Example",
            "=?UTF-8?B?Wm/DqyBFeGFtcGxl?= <jane@example.com>",
        ),
        ("", "jane@example.com"),
        ("Jane Doe", "Jane Doe <jane@example.com>"),
    ];
    for (i, (name, want)) in cases.iter().enumerate() {
        let o = send(&p, &r, "jane@example.com", &["jane@example.com", name]).await;
        assert_eq!(o.kind, OutcomeKind::Delivered, "{name:?}: {o:?}");
        let (m, meta) = peer.message(i + 1);
        assert_eq!(header(&m, "To").as_deref(), Some(*want), "{name:?}");
        // The envelope comes from the parsed address, never from header text.
        assert_eq!(meta["rcpt_tos"], serde_json::json!(["jane@example.com"]));
        assert_eq!(meta["mail_from"], "news@example.com");
    }
}

#[tokio::test]
async fn f8_bcc_in_the_template_never_reaches_recipients() {
    let Some(peer) = Peer::start("f8", &[]) else {
        return;
    };
    let p = pool(&peer);
    let r = campaign(
        "From: news@example.com\nTo: {{ email }}\nBcc: boss@example.com\nbcc: {{ email }},\n audit@example.com\nSubject: x\n\nhi\n",
        &["email"],
    );
    let o = send(&p, &r, "a@example.com", &["a@example.com"]).await;
    assert_eq!(o.kind, OutcomeKind::Delivered, "{o:?}");
    let (m, meta) = peer.message(1);
    assert_eq!(header_names(&m), ["from", "to", "subject", "message-id"]);
    let text = String::from_utf8_lossy(&m).to_ascii_lowercase();
    assert!(
        !text.contains("boss@") && !text.contains("audit@"),
        "{text}"
    );
    assert_eq!(meta["rcpt_tos"], serde_json::json!(["a@example.com"]));
}

/// A key pair made with openssl: (PEM private key, DNS TXT record).
fn dkim_key(algorithm: DkimAlgorithm) -> (String, String) {
    let dir = temp_dir("dkim-key");
    let (gen_args, k): (&[&str], &str) = match algorithm {
        DkimAlgorithm::RsaSha256 => (
            &[
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
                "-out",
                "k.pem",
            ],
            "rsa",
        ),
        DkimAlgorithm::Ed25519Sha256 => (
            &["genpkey", "-algorithm", "ed25519", "-out", "k.pem"],
            "ed25519",
        ),
    };
    openssl(&dir, gen_args);
    let mut der = openssl(
        &dir,
        &["pkey", "-in", "k.pem", "-pubout", "-outform", "DER"],
    );
    if algorithm == DkimAlgorithm::Ed25519Sha256 {
        // RFC 8463: the record holds the raw 32-byte key, not the SubjectPublicKeyInfo.
        der = der[der.len() - 32..].to_vec();
    }
    std::fs::write(dir.join("pub.der"), &der).unwrap();
    let b64 = openssl(&dir, &["base64", "-A", "-in", "pub.der"]);
    let pem = std::fs::read_to_string(dir.join("k.pem")).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    (
        pem,
        format!(
            "v=DKIM1; k={k}; p={}",
            String::from_utf8(b64).unwrap().trim()
        ),
    )
}

/// dkimpy's verdict on a stored message: Ok on pass, Err(reason) otherwise.
fn dkimpy(path: &std::path::Path, txt: &str) -> Result<(), String> {
    let out = std::process::Command::new("python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/peers/dkim_verify.py"
        ))
        .arg(path)
        .args(["s1", "example.com", txt])
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !said.contains("ModuleNotFoundError"),
        "the DKIM test needs dkimpy and pynacl for python3 (`python3 -m pip install dkimpy \
         pynacl`, or Debian python3-dkim python3-nacl): {said}"
    );
    if out.status.success() {
        Ok(())
    } else {
        Err(said)
    }
}

async fn dkim_round_trip(algorithm: DkimAlgorithm, peer_args: &[&str], long: &str) {
    let Some(peer) = Peer::start("dkim", peer_args) else {
        return;
    };
    let (pem, txt) = dkim_key(algorithm);
    let signer = Signer::new(&Dkim {
        domain: "example.com".into(),
        selector: "s1".into(),
        algorithm,
        private_key_pem: pem,
    })
    .unwrap();
    let p = pool(&peer).with_dkim(signer);
    // Everything that changes bytes between rendering and the wire: merge text in headers
    // (re-emitted, encoded), bare line endings, dot lines, a long line (quoted-printable),
    // 8-bit text (converted when the server lacks 8BITMIME).
    let r = campaign(
        "From: News <news@example.com>\nTo: {{ name }} <{{ email }}>\nSubject: Grüße, {{ name }}\nDate: Mon, 1 Jan 2024 00:00:00 +0000\n\nHallo {{ name }},\n.dot line\n{{ long }}\n\n\n",
        &["email", "name", "long"],
    );
    let o = send(
        &p,
        &r,
        "zoe@example.com",
        &["zoe@example.com", "Zoë\nX", long],
    )
    .await;
    assert_eq!(o.kind, OutcomeKind::Delivered, "{o:?}");
    let (m, _) = peer.message(1);
    assert!(
        m.starts_with(b"DKIM-Signature: v=1; a="),
        "{}",
        String::from_utf8_lossy(&m)
    );
    if peer_args.contains(&"--no-8bitmime") {
        assert!(
            m.is_ascii() && m.windows(6).any(|w| w == b"caf=C3"),
            "{}",
            String::from_utf8_lossy(&m)
        );
    }
    assert_clean(&m);
    dkimpy(&peer.message_path(1), &txt).unwrap_or_else(|e| {
        panic!(
            "dkimpy rejected the stored message: {e}\n{}",
            String::from_utf8_lossy(&m)
        )
    });
    // The verifier really checks: one changed body byte fails it.
    let mut tampered = m.clone();
    let at = tampered.windows(5).position(|w| w == b"Hallo").unwrap();
    tampered[at] = b'J';
    std::fs::write(peer.message_path(1), &tampered).unwrap();
    assert!(dkimpy(&peer.message_path(1), &txt).is_err());
}

#[tokio::test]
async fn dkim_rsa_sha256_verifies_with_dkimpy() {
    dkim_round_trip(
        DkimAlgorithm::RsaSha256,
        &[],
        &format!("café {}", "z".repeat(1200)),
    )
    .await;
}

#[tokio::test]
async fn dkim_ed25519_verifies_with_dkimpy() {
    dkim_round_trip(
        DkimAlgorithm::Ed25519Sha256,
        &[],
        &format!("café {}", "z".repeat(1200)),
    )
    .await;
}

#[tokio::test]
async fn dkim_signs_the_7bit_form_sent_to_a_server_without_8bitmime() {
    // Short lines: the body stays 8-bit through rendering and is converted by the session.
    dkim_round_trip(
        DkimAlgorithm::Ed25519Sha256,
        &["--no-8bitmime"],
        "café crème",
    )
    .await;
}
