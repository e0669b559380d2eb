//! The edge-case campaign of `shared/corpus/campaign/` (names with commas, quotes, non-ASCII,
//! CR/LF/NUL injection, a 1200-character name, IDN and UTF-8 addresses, invalid and duplicate
//! rows) delivered by the real governor and workers to two independent receivers:
//!
//! - Python aiosmtpd (SMTPUTF8 offered): every valid row arrives exactly once;
//! - Postfix smtp-sink (no SMTPUTF8): the same, except the UTF-8 local part, which must end
//!   `bounced` with a reason naming SMTPUTF8 while the run still exits 0.
//!
//! Each stored message is checked for: envelope (MAIL FROM, RCPT = parsed address, IDN as
//! A-label), exactly the template's header fields plus Message-ID (no injected Bcc or body), header
//! values and body as Python's `email` package decodes them equal to the CSV values, dot lines
//! intact, no line over 998 octets, no bare CR/LF (exact receiver), 8-bit body only with
//! BODY=8BITMIME. Invalid rows (3 bad addresses, 1 duplicate) must be reported in the summary
//! and the spool with a reason.

use std::collections::BTreeMap;
use std::time::Duration;

use integration::*;
use serde_json::Value;

/// The rows whose address is not valid (the duplicate `alice@example.com` is the other invalid row).
const BAD_ADDRESSES: [&str; 3] = ["not-an-address", "missing-domain@", "two@@example.com"];
/// The row that needs SMTPUTF8.
const UTF8_LOCAL: &str = "ñandú@example.com";

struct Row {
    email: String,
    fields: BTreeMap<String, String>,
}

struct Corpus {
    csv: Vec<u8>,
    template: String,
    /// Valid rows, first occurrence of each address.
    valid: Vec<Row>,
    rows: usize,
}

fn load_corpus() -> Corpus {
    let dir = corpus_dir().join("campaign");
    let csv = std::fs::read(dir.join("recipients.csv")).expect("corpus recipients.csv");
    let template = std::fs::read_to_string(dir.join("template.eml")).expect("corpus template.eml");
    let recs = parse_csv(std::str::from_utf8(&csv).unwrap());
    let header = recs[0].clone();
    let mut valid: Vec<Row> = Vec::new();
    for r in &recs[1..] {
        let fields: BTreeMap<String, String> =
            header.iter().cloned().zip(r.iter().cloned()).collect();
        let email = fields["email"].clone();
        if BAD_ADDRESSES.contains(&email.as_str())
            || valid.iter().any(|v| v.email.eq_ignore_ascii_case(&email))
        {
            continue;
        }
        valid.push(Row { email, fields });
    }
    Corpus {
        csv,
        template,
        valid,
        rows: recs.len() - 1,
    }
}

fn has_ctl(s: &str) -> bool {
    s.chars().any(|c| c.is_control())
}

/// Whitespace-insensitive form: runs of white space (and NUL) become one space, trimmed.
fn norm(s: &str) -> String {
    s.replace('\0', " ")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// Everything but white space and control characters, for values the governor had to sanitise.
fn squash(s: &str) -> String {
    s.chars()
        .filter(|c| !c.is_whitespace() && !c.is_control())
        .collect()
}

/// `got` shows `want`: exactly (modulo white-space runs) for clean values; for values with
/// CR/LF/NUL/TAB, every other character kept in order.
fn same_text(got: &str, want: &str) -> bool {
    if has_ctl(want) {
        squash(got) == squash(want)
    } else {
        norm(got) == norm(want)
    }
}

/// Envelope equality without any conversion: local part exact, domain ASCII case-insensitive.
fn envelope_eq(got: &str, want: &str) -> bool {
    match (got.rsplit_once('@'), want.rsplit_once('@')) {
        (Some((lg, dg)), Some((lw, dw))) => lg == lw && dg.eq_ignore_ascii_case(dw),
        _ => got == want,
    }
}

fn header<'a>(parsed: &'a Value, name: &str) -> Vec<&'a str> {
    parsed["headers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|h| h[0].as_str().unwrap().eq_ignore_ascii_case(name))
        .map(|h| h[1].as_str().unwrap())
        .collect()
}

fn strip_angle(s: &str) -> &str {
    s.trim().trim_start_matches('<').trim_end_matches('>')
}

fn deliver_corpus(kind: PeerKind) {
    let c = load_corpus();
    assert_eq!(c.rows, 23, "corpus rows");
    assert_eq!(c.valid.len(), 19, "corpus valid rows");
    let smtputf8 = kind == PeerKind::Aiosmtpd;

    let tmp = TestDir::new(&format!("corpus-{kind:?}"));
    let peer = match kind {
        PeerKind::Aiosmtpd => Peer::aiosmtpd(&tmp.join("received")),
        PeerKind::SmtpSink => Peer::smtp_sink(&tmp.join("received"), &[]),
        PeerKind::GovernorSink => unreachable!(),
    };
    let camp = Campaign::new(&tmp.join("run"), peer.port)
        .rate(200.0)
        .workers(1, 2)
        .campaign("edge", c.csv.clone(), c.template.clone());
    let cfg = camp.write();
    let out = run_governor(&cfg, &[], Duration::from_secs(120));
    out.expect_code(0);
    let sum = out.summary();

    let mut failures: Vec<String> = Vec::new();
    let mut check = |ok: bool, what: String| {
        if !ok {
            failures.push(what);
        }
    };

    // --- summary and spool
    let want_delivered = if smtputf8 { 19 } else { 18 };
    let want_bounced = if smtputf8 { 0 } else { 1 };
    check(
        sum["status"] == "complete",
        format!("summary status {}", sum["status"]),
    );
    check(
        sum["total"] == 23,
        format!("summary total {} != 23", sum["total"]),
    );
    check(
        sum["invalid"] == 4,
        format!("summary invalid {} != 4", sum["invalid"]),
    );
    check(
        sum["delivered"] == want_delivered,
        format!("summary delivered {} != {want_delivered}", sum["delivered"]),
    );
    check(
        sum["bounced"] == want_bounced,
        format!("summary bounced {} != {want_bounced}", sum["bounced"]),
    );
    check(
        sum["pending"] == 0,
        format!("summary pending {} != 0", sum["pending"]),
    );

    let states = spool_states(&camp.spool());
    let mut want_states = BTreeMap::from([
        ("delivered".to_string(), want_delivered),
        ("invalid".to_string(), 4),
    ]);
    if want_bounced > 0 {
        want_states.insert("bounced".into(), want_bounced);
    }
    check(
        states == want_states,
        format!("spool states {states:?} != {want_states:?}"),
    );

    let jobs = spool_jobs(&camp.spool());
    let invalid: Vec<&JobRow> = jobs.iter().filter(|j| j.state == "invalid").collect();
    let mut invalid_addrs: Vec<&str> = invalid.iter().map(|j| j.recipient.as_str()).collect();
    invalid_addrs.sort_unstable();
    let mut want_invalid = vec![
        "alice@example.com",
        "missing-domain@",
        "not-an-address",
        "two@@example.com",
    ];
    want_invalid.sort_unstable();
    check(
        invalid_addrs == want_invalid,
        format!("invalid rows {invalid_addrs:?} != {want_invalid:?}"),
    );
    for j in &invalid {
        let reason = j.reason.clone().unwrap_or_default();
        check(
            !reason.trim().is_empty(),
            format!("invalid row {} has no reason", j.recipient),
        );
        if j.recipient == "alice@example.com" {
            check(
                reason.to_lowercase().contains("dup"),
                format!("duplicate alice: reason {reason:?} does not say duplicate"),
            );
        }
    }
    // The first alice (Smith, Berlin) is the one delivered.
    check(
        jobs.iter()
            .any(|j| j.recipient == "alice@example.com" && j.state == "delivered"),
        "first alice@example.com row not delivered".into(),
    );

    if !smtputf8 {
        let j = jobs.iter().find(|j| j.recipient == UTF8_LOCAL);
        let text = j.and_then(|j| j.last_text.clone()).unwrap_or_default();
        check(
            j.is_some_and(|j| j.state == "bounced"),
            format!(
                "{UTF8_LOCAL} without SMTPUTF8: state {:?}, want bounced",
                j.map(|j| &j.state)
            ),
        );
        check(
            text.to_uppercase().contains("SMTPUTF8"),
            format!("{UTF8_LOCAL} bounce reason {text:?} does not name SMTPUTF8"),
        );
        let log = camp.delivery_log();
        check(
            log.iter()
                .any(|l| l["recipient"] == UTF8_LOCAL && l["outcome"] == "bounced"),
            format!("delivery.jsonl has no bounced line for {UTF8_LOCAL}"),
        );
    }

    // --- what the receiver stored
    let stored = peer.messages();
    check(
        stored.len() == want_delivered as usize,
        format!(
            "receiver stored {} messages, want {want_delivered}",
            stored.len()
        ),
    );
    let parsed = parse_mail(
        &tmp.join("parse"),
        &stored.iter().map(|s| s.data.as_slice()).collect::<Vec<_>>(),
    );
    let template_body = c.template.split_once("\n\n").expect("template body").1;
    let mut want_names: Vec<String> = header_names(c.template.as_bytes())
        .iter()
        .map(|n| n.to_ascii_lowercase())
        .collect();
    want_names.push("message-id".into());
    want_names.sort();

    for s in &stored {
        check(
            s.rcpt.len() == 1,
            format!(
                "{}: {} RCPTs {:?}, want one per message",
                s.file.display(),
                s.rcpt.len(),
                s.rcpt
            ),
        );
        check(
            s.mail_from == "bounces@example.com",
            format!("{}: MAIL FROM {:?}", s.file.display(), s.mail_from),
        );
    }

    for row in &c.valid {
        let bounced_here = !smtputf8 && row.email == UTF8_LOCAL;
        let want_rcpt = envelope_form(&row.email);
        let hits: Vec<usize> = (0..stored.len())
            .filter(|&i| stored[i].rcpt.iter().any(|r| envelope_eq(r, &want_rcpt)))
            .collect();
        if bounced_here {
            check(
                hits.is_empty(),
                format!("{}: delivered to a receiver without SMTPUTF8", row.email),
            );
            continue;
        }
        check(
            hits.len() == 1,
            format!(
                "{}: stored {} times (RCPT {want_rcpt:?}), want exactly once",
                row.email,
                hits.len()
            ),
        );
        let Some(&i) = hits.first() else { continue };
        let (s, p) = (&stored[i], &parsed[i]);
        let who = format!("{} ({})", row.email, s.file.display());

        // lines
        let faults = line_faults(&s.data, s.exact);
        check(faults.is_empty(), format!("{who}: line faults {faults:?}"));

        // header fields: the template's plus Message-ID, nothing injected
        let mut names: Vec<String> = header_names(&s.data)
            .iter()
            .map(|n| n.to_ascii_lowercase())
            .collect();
        names.sort();
        check(
            names == want_names,
            format!("{who}: header fields {names:?} != {want_names:?}"),
        );
        let hdr = header_section(&s.data);
        if row.email != UTF8_LOCAL {
            check(
                hdr.is_ascii(),
                format!("{who}: raw 8-bit bytes in the header section (must be RFC 2047 encoded)"),
            );
        } else {
            check(
                s.mail_params.iter().any(|p| p == "SMTPUTF8"),
                format!("{who}: MAIL FROM without SMTPUTF8: {:?}", s.mail_params),
            );
        }
        let body_raw = &s.data[hdr.len()..];
        if !body_raw.is_ascii() {
            check(
                s.mail_params.iter().any(|p| p == "BODY=8BITMIME"),
                format!(
                    "{who}: 8-bit body sent without BODY=8BITMIME ({:?})",
                    s.mail_params
                ),
            );
        }
        for e in p["errors"].as_array().unwrap() {
            check(false, format!("{who}: Python email error {e}"));
        }

        // decoded header values
        let f = &row.fields;
        let subject = header(p, "subject");
        let want_subject = format!("Hello {}, your {} update", f["first_name"], f["city"]);
        check(
            subject.len() == 1
                && same_text(subject[0], &want_subject)
                && !subject[0].contains(['\r', '\n']),
            format!("{who}: Subject {subject:?}, want {want_subject:?}"),
        );
        let to = p["addresses"]["to"].as_array().cloned().unwrap_or_default();
        let want_display = format!("{} {}", f["first_name"], f["last_name"]);
        check(
            to.len() == 1,
            format!("{who}: To has {} addresses: {to:?}", to.len()),
        );
        if let Some(a) = to.first() {
            let (disp, spec) = (a[0].as_str().unwrap(), a[1].as_str().unwrap());
            check(
                same_text(disp, &want_display) && !disp.contains(['\r', '\n']),
                format!("{who}: To display name {disp:?}, want {want_display:?}"),
            );
            check(
                same_mailbox(spec, &row.email),
                format!("{who}: To address {spec:?}, want {:?}", row.email),
            );
        }
        let from = p["addresses"]["from"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        check(
            from.len() == 1 && from[0][1] == "news@example.com" && from[0][0] == "Example News",
            format!("{who}: From {from:?}"),
        );
        let mid = header(p, "message-id");
        let job = jobs.iter().find(|j| j.recipient == row.email);
        check(
            mid.len() == 1
                && job.is_some_and(|j| strip_angle(&j.message_id) == strip_angle(mid[0])),
            format!(
                "{who}: Message-ID {mid:?} vs spool {:?}",
                job.map(|j| &j.message_id)
            ),
        );

        // decoded body
        let want_body = render(template_body, f)
            .replace("\r\n", "\n")
            .replace('\r', "\n");
        match p["body"].as_str() {
            None => check(false, format!("{who}: no decodable body")),
            Some(body) => {
                let ok = if has_ctl(&format!("{}{}", f["first_name"], f["city"])) {
                    squash(body) == squash(&want_body)
                } else {
                    body == want_body
                };
                check(ok, format!("{who}: body {body:?}\n  want {want_body:?}"));
                let lines: Vec<&str> = body.lines().collect();
                for dot in [
                    ".this line starts with a dot and must arrive with one dot.",
                    ".",
                    "..two dots stay two dots.",
                ] {
                    check(
                        lines.contains(&dot),
                        format!("{who}: body lacks the line {dot:?}"),
                    );
                }
            }
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
fn corpus_campaign_to_aiosmtpd_delivers_every_valid_row_once_and_intact() {
    deliver_corpus(PeerKind::Aiosmtpd);
}

#[test]
fn corpus_campaign_to_smtp_sink_bounces_only_the_smtputf8_row() {
    deliver_corpus(PeerKind::SmtpSink);
}
