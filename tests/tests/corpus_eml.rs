//! Every real message in `shared/corpus/eml/**/*.eml` (RFC examples and third-party samples:
//! mixed line ends, no final newline, 8-bit text, NUL bytes, multipart) used as a template with no
//! placeholders, one recipient each, relayed by the real governor and workers to two independent
//! receivers. What the receiver stores must equal the template with its line ends normalised to
//! CRLF, apart from the receiver's own trace lines and the Message-ID the governor adds when the
//! template has none (a Message-ID already present is kept as is).
//!
//! A few synthetic templates cover what the corpus lacks: a Bcc header (must be removed and never
//! become a recipient), a body whose first byte is `.` plus `..` and `.` lines (dot-stuffing), and
//! a `.` line after a bare LF (must not end DATA early).
//!
//! aiosmtpd stores exact bytes, so the CRLF normalisation is checked byte for byte; smtp-sink
//! stores lines with LF ends, so there the comparison is line by line.

use std::time::Duration;

use integration::*;

struct Case {
    /// Campaign name, e.g. `thirdparty-005`.
    name: String,
    template: Vec<u8>,
    /// What the receiver must store, apart from an added Message-ID.
    want: Vec<u8>,
}

fn recipient(c: &Case) -> String {
    format!("{}@example.com", c.name)
}

fn cases() -> Vec<Case> {
    let root = corpus_dir().join("eml");
    let mut out = Vec::new();
    for sub in ["rfc", "thirdparty"] {
        let mut files: Vec<_> = std::fs::read_dir(root.join(sub))
            .unwrap_or_else(|e| panic!("{}: {e}", root.join(sub).display()))
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "eml"))
            .collect();
        files.sort();
        for f in files {
            let template = std::fs::read(&f).unwrap();
            let name = format!("{sub}-{}", f.file_stem().unwrap().to_string_lossy());
            out.push(Case {
                name,
                want: to_crlf(&template),
                template,
            });
        }
    }
    assert!(
        out.len() >= 30,
        "expected the 30 corpus messages, found {}",
        out.len()
    );
    let synthetic: [(&str, &[u8], &[u8]); 3] = [
        (
            "synthetic-bcc",
            b"From: a@example.com\nTo: b@example.com\nBcc: hidden@example.net,\n other@example.net\nSubject: bcc\n\nbody\n",
            b"From: a@example.com\r\nTo: b@example.com\r\nSubject: bcc\r\n\r\nbody\r\n",
        ),
        (
            "synthetic-dot-first",
            b"Subject: dots\n\n.starts with a dot\n..\n.\n.\r\n...three\n",
            b"Subject: dots\r\n\r\n.starts with a dot\r\n..\r\n.\r\n.\r\n...three\r\n",
        ),
        (
            "synthetic-bare-lf-dot",
            b"Subject: mixed\r\n\r\nHi\n.\nBye\r\nlast",
            b"Subject: mixed\r\n\r\nHi\r\n.\r\nBye\r\nlast\r\n",
        ),
    ];
    for (name, template, want) in synthetic {
        out.push(Case {
            name: name.into(),
            template: template.to_vec(),
            want: want.to_vec(),
        });
    }
    out
}

fn has_message_id(msg: &[u8]) -> bool {
    header_names(msg)
        .iter()
        .any(|n| n.eq_ignore_ascii_case("message-id"))
}

fn lf(b: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\r' && b.get(i + 1) == Some(&b'\n') {
            i += 1;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

/// First differing line, for messages.
fn first_difference(got: &[u8], want: &[u8]) -> String {
    let g: Vec<&[u8]> = got.split(|&b| b == b'\n').collect();
    let w: Vec<&[u8]> = want.split(|&b| b == b'\n').collect();
    for i in 0..g.len().max(w.len()) {
        let (a, b) = (g.get(i), w.get(i));
        if a != b {
            return format!(
                "line {}: got {:?}, want {:?} ({} vs {} bytes in all)",
                i + 1,
                a.map(|x| String::from_utf8_lossy(x)),
                b.map(|x| String::from_utf8_lossy(x)),
                got.len(),
                want.len()
            );
        }
    }
    "equal".into()
}

fn relay_corpus(kind: PeerKind) {
    let cases = cases();
    let tmp = TestDir::new(&format!("eml-{kind:?}"));
    let peer = match kind {
        PeerKind::Aiosmtpd => Peer::aiosmtpd(&tmp.join("received")),
        PeerKind::SmtpSink => Peer::smtp_sink(&tmp.join("received"), &[]),
        PeerKind::GovernorSink => unreachable!(),
    };
    let mut camp = Campaign::new(&tmp.join("run"), peer.port)
        .rate(500.0)
        .workers(1, 2);
    for c in &cases {
        camp = camp.campaign(
            &c.name,
            format!("email\r\n{}\r\n", recipient(c)),
            c.template.clone(),
        );
    }
    let cfg = camp.write();
    let out = run_governor(&cfg, &[], Duration::from_secs(120));
    out.expect_code(0);
    let sum = out.summary();
    assert_eq!(sum["status"], "complete", "summary {sum}");
    assert_eq!(sum["delivered"], cases.len(), "summary {sum}");

    let stored = peer.messages();
    let mut failures = Vec::new();
    if stored.len() != cases.len() {
        failures.push(format!(
            "receiver stored {} messages, want {}",
            stored.len(),
            cases.len()
        ));
    }
    for c in &cases {
        let rcpt = recipient(c);
        let hits: Vec<&Stored> = stored
            .iter()
            .filter(|s| s.rcpt.iter().any(|r| r == &rcpt))
            .collect();
        let [s] = hits.as_slice() else {
            failures.push(format!(
                "{}: stored {} times, want once",
                c.name,
                hits.len()
            ));
            continue;
        };
        if s.rcpt != [rcpt.clone()] {
            failures.push(format!("{}: RCPTs {:?}, want only {rcpt}", c.name, s.rcpt));
        }
        let faults = line_faults(&s.data, s.exact);
        if !faults.is_empty() {
            failures.push(format!("{}: line faults {faults:?}", c.name));
        }
        let (got, added) = if has_message_id(&c.template) {
            (s.data.clone(), 0)
        } else {
            remove_header(&s.data, "Message-ID")
        };
        if !has_message_id(&c.template) && added != 1 {
            failures.push(format!(
                "{}: template without Message-ID, stored {added} Message-ID fields (want 1)",
                c.name
            ));
        }
        let want = if s.exact { c.want.clone() } else { lf(&c.want) };
        if got != want {
            failures.push(format!(
                "{} ({}): stored bytes differ: {}",
                c.name,
                s.file.display(),
                first_difference(&got, &want)
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} problem(s):\n- {}",
        failures.len(),
        failures.join("\n- ")
    );
}

#[test]
fn corpus_eml_relayed_to_aiosmtpd_byte_exact_with_crlf() {
    relay_corpus(PeerKind::Aiosmtpd);
}

#[test]
fn corpus_eml_relayed_to_smtp_sink_line_exact() {
    relay_corpus(PeerKind::SmtpSink);
}
