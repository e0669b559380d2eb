//! Unit tests of personalisation: one per rule of the module doc and per FAULTS.md case.

use super::*;

fn spec(template: &str, fields: &[&str]) -> CampaignSpec {
    CampaignSpec {
        campaign_id: 1,
        name: "test".into(),
        template: template.into(),
        sender: "news@example.com".into(),
        fields: fields.iter().map(|s| s.to_string()).collect(),
    }
}

fn job(recipient: &str, values: &[&str]) -> Job {
    Job {
        job_id: 7,
        lease_id: 9,
        campaign_id: 1,
        attempt: 1,
        recipient: recipient.into(),
        values: values.iter().map(|s| s.to_string()).collect(),
        message_id: "job-7@example.com".into(),
    }
}

fn render(
    template: &str,
    fields: &[&str],
    rcpt: &str,
    values: &[&str],
) -> Result<Rendered, RenderError> {
    Renderer::new(&spec(template, fields))?.render(&job(rcpt, values))
}

fn text(r: &Rendered) -> String {
    String::from_utf8(r.bytes.clone()).unwrap()
}

fn header_names(msg: &str) -> Vec<String> {
    let head = msg.split("\r\n\r\n").next().unwrap();
    head.split("\r\n")
        .filter(|l| !l.starts_with([' ', '\t']) && !l.is_empty())
        .map(|l| l.split(':').next().unwrap().to_ascii_lowercase())
        .collect()
}

fn header_value(msg: &str, name: &str) -> String {
    let head = msg.split("\r\n\r\n").next().unwrap();
    let unfolded = head.replace("\r\n ", " ").replace("\r\n\t", "\t");
    unfolded
        .split("\r\n")
        .find(|l| {
            l.to_ascii_lowercase()
                .starts_with(&format!("{}:", name.to_ascii_lowercase()))
        })
        .map(|l| l[name.len() + 1..].trim().to_string())
        .unwrap_or_default()
}

/// Asserts the invariants every sent message must hold (F2, F3).
fn assert_wire_clean(bytes: &[u8]) {
    for (i, &b) in bytes.iter().enumerate() {
        if b == b'\r' {
            assert_eq!(bytes.get(i + 1), Some(&b'\n'), "bare CR at {i}");
        }
        if b == b'\n' {
            assert!(i > 0 && bytes[i - 1] == b'\r', "bare LF at {i}");
        }
    }
    for line in bytes.split(|&b| b == b'\n') {
        assert!(line.len() <= MAX_LINE + 1, "line of {} octets", line.len());
    }
}

/// Decodes RFC 2047 B encoded-words (the only kind this module writes), for assertions.
fn decode_words(s: &str) -> String {
    let mut out = Vec::new();
    let mut rest = s;
    let mut last_was_word = false;
    while !rest.is_empty() {
        if let Some(start) = rest.find("=?UTF-8?B?") {
            let (before, after) = rest.split_at(start);
            if !(last_was_word && before.trim().is_empty()) {
                out.extend_from_slice(before.as_bytes());
            }
            let end = after[10..].find("?=").unwrap() + 10;
            out.extend(b64decode(&after[10..end]));
            rest = &after[end + 2..];
            last_was_word = true;
        } else {
            out.extend_from_slice(rest.as_bytes());
            break;
        }
    }
    String::from_utf8(out).unwrap()
}

fn b64decode(s: &str) -> Vec<u8> {
    const T: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut bits = 0u32;
    let mut n = 0;
    let mut out = Vec::new();
    for c in s.chars().filter(|&c| c != '=') {
        bits = (bits << 6) | T.find(c).unwrap() as u32;
        n += 6;
        if n >= 8 {
            n -= 8;
            out.push((bits >> n) as u8);
        }
    }
    out
}

#[test]
fn check_template_accepts_good_templates() {
    let fields = vec!["first_name".to_string(), "email".to_string()];
    check_template(
        "To: {{ email }}\nSubject: Hi {{ first_name }}\n\nHello {{ first_name }}\n",
        &fields,
    )
    .unwrap();
    // No blank line between header and body: a header-only message is fine.
    check_template("Subject: x\n", &fields).unwrap();
    check_template("Subject: x\n\n", &fields).unwrap();
}

#[test]
fn check_template_names_unknown_field_and_line() {
    let fields = vec!["first_name".to_string()];
    let e = check_template("Subject: x\n\nHello\n{{ frist_name }}\n", &fields).unwrap_err();
    match &e {
        RenderError::Template { line, message } => {
            assert_eq!(*line, Some(4), "{e}");
            assert!(message.contains("frist_name"), "{e}");
        }
        other => panic!("{other:?}"),
    }
    let e = check_template("Subject: {{ nope }}\n\nbody", &fields).unwrap_err();
    assert!(
        e.to_string().contains("line 1") && e.to_string().contains("nope"),
        "{e}"
    );
}

#[test]
fn check_template_reports_syntax_errors_with_line() {
    let e = check_template(
        "Subject: x\n\nline 3\n{{ first_name \n",
        &["first_name".to_string()],
    )
    .unwrap_err();
    assert!(
        matches!(e, RenderError::Template { line: Some(4), .. }),
        "{e}"
    );
    let e = check_template("Subject: {% if %}\n\nbody", &[]).unwrap_err();
    assert!(
        matches!(e, RenderError::Template { line: Some(1), .. }),
        "{e}"
    );
}

#[test]
fn check_template_refuses_header_line_without_colon() {
    let e = check_template("Subject: x\nthis is not a header\n\nbody", &[]).unwrap_err();
    assert!(
        matches!(e, RenderError::Template { line: Some(2), .. }),
        "{e}"
    );
    assert!(e.to_string().contains("colon"), "{e}");
}

#[test]
fn text_without_placeholders_is_byte_identical_apart_from_line_endings() {
    let t = "Subject: plain\r\nMessage-ID: <a@b>\r\nX-Weird:  two  spaces\t\r\n\r\nbody\r\n.\r\n..x\r\n\r\n";
    let r = render(t, &[], "a@example.com", &[]).unwrap();
    assert_eq!(text(&r), t);
    // LF and bare CR become CRLF; CRLF stays CRLF (idempotent).
    let r = render(
        "Subject: x\nMessage-ID: <a@b>\n\nHi\n.\nBye\r\na\rb\r\n",
        &[],
        "a@example.com",
        &[],
    )
    .unwrap();
    assert_eq!(
        text(&r),
        "Subject: x\r\nMessage-ID: <a@b>\r\n\r\nHi\r\n.\r\nBye\r\na\r\nb\r\n"
    );
    let again = render(&text(&r), &[], "a@example.com", &[]).unwrap();
    assert_eq!(again.bytes, r.bytes);
}

#[test]
fn message_id_added_only_when_missing() {
    let r = render("Subject: x\n\nbody\n", &[], "a@example.com", &[]).unwrap();
    assert_eq!(
        text(&r),
        "Subject: x\r\nMessage-ID: <job-7@example.com>\r\n\r\nbody\r\n"
    );
    let r = render(
        "Subject: x\nmessage-id:   <keep@me>\n\nbody\n",
        &[],
        "a@example.com",
        &[],
    )
    .unwrap();
    assert_eq!(
        text(&r),
        "Subject: x\r\nmessage-id:   <keep@me>\r\n\r\nbody\r\n"
    );
}

#[test]
fn undefined_at_render_time_is_an_error() {
    // `check_template` rejects unknown names; a missing attribute is caught by Strict mode.
    let e = render("Subject: {{ a.b }}\n\nx", &["a"], "a@example.com", &["v"]).unwrap_err();
    assert!(matches!(e, RenderError::Template { .. }), "{e}");
    let e = render(
        "Subject: x\n\n{{ a }}",
        &["a", "b"],
        "a@example.com",
        &["v"],
    )
    .unwrap_err();
    assert!(e.to_string().contains("merge values"), "{e}");
}

#[test]
fn header_injection_never_adds_fields() {
    let t = "Subject: Hi {{ n }}\nMessage-ID: <x@y>\n\nHello {{ n }}\n";
    for n in [
        "Alice\r\nBcc: someone@example.net",
        "Alice\nBcc: someone@example.net",
        "Alice\rBcc: someone@example.net",
        "Eve\r\n\r\nfake body",
        "Nul\0Name",
    ] {
        let r = render(t, &["n"], "a@example.com", &[n]).unwrap();
        let m = text(&r);
        assert_eq!(header_names(&m), ["subject", "message-id"], "{m:?}");
        assert_wire_clean(&r.bytes);
        assert!(!m.contains('\0'), "{m:?}");
    }
    let r = render(t, &["n"], "a@example.com", &["Alice\r\n\r\nBcc: x"]).unwrap();
    assert_eq!(header_value(&text(&r), "Subject"), "Hi Alice Bcc: x");
}

#[test]
fn bcc_in_template_is_removed() {
    let r = render(
        "To: a@example.com\nBcc: list@example.com,\n  other@example.com\nSubject: x\n\nb",
        &[],
        "a@example.com",
        &[],
    )
    .unwrap();
    assert_eq!(header_names(&text(&r)), ["to", "subject", "message-id"]);
}

#[test]
fn display_names_are_quoted_or_encoded() {
    let t = "To: {{ name }} <{{ email }}>\n\nb";
    let cases = [
        (
            "Doe, Jane",
            "jane@example.com",
            "\"Doe, Jane\" <jane@example.com>",
        ),
        (
            "Support (Billing)",
            "billing@example.com",
            "\"Support (Billing)\" <billing@example.com>",
        ),
        (
            "Jo \"JJ\" \\ Jones",
            "quote@example.com",
            "\"Jo \\\"JJ\\\" \\\\ Jones\" <quote@example.com>",
        ),
        (
            "Alice Smith",
            "alice@example.com",
            "Alice Smith <alice@example.com>",
        ),
        ("", "empty@example.com", "empty@example.com"),
        ("   ", "empty@example.com", "empty@example.com"),
        (".", "dot@example.com", "\".\" <dot@example.com>"),
        (
            "Zoë Example",
            "zoe@example.com",
            "=?UTF-8?B?Wm/DqyBFeGFtcGxl?= <zoe@example.com>",
        ),
    ];
    for (name, email, want) in cases {
        let r = render(t, &["name", "email"], email, &[name, email]).unwrap();
        assert_eq!(header_value(&text(&r), "To"), want, "{name:?}");
        assert_eq!(r.envelope_to, email);
    }
}

#[test]
fn quoted_template_name_takes_merge_text_literally() {
    // The sample template quotes the name itself: merge quotes must not end that quote.
    let t = "To: \"{{ first }} {{ last }}\" <{{ email }}>\n\nb";
    let r = render(
        t,
        &["first", "last", "email"],
        "q@example.com",
        &["Jo \"JJ\" \\ Jones", "Jones", "q@example.com"],
    )
    .unwrap();
    assert_eq!(
        header_value(&text(&r), "To"),
        "\"Jo \\\"JJ\\\" \\\\ Jones Jones\" <q@example.com>"
    );
    let r = render(
        t,
        &["first", "last", "email"],
        "e@example.com",
        &["", "", "e@example.com"],
    )
    .unwrap();
    assert_eq!(header_value(&text(&r), "To"), "e@example.com");
    let r = render(
        t,
        &["first", "last", "email"],
        "z@example.com",
        &["Zoë", "Ëxample", "z@example.com"],
    )
    .unwrap();
    let v = header_value(&text(&r), "To");
    assert!(v.starts_with("=?UTF-8?B?") && !v.contains('"'), "{v}");
    assert_eq!(decode_words(&v), "Zoë Ëxample <z@example.com>");
}

#[test]
fn non_ascii_unstructured_header_is_encoded() {
    let r = render(
        "Subject: Hello {{ n }}, your {{ c }} update\n\nb",
        &["n", "c"],
        "a@example.com",
        &["Zoë", "Zürich"],
    )
    .unwrap();
    let m = text(&r);
    let v = header_value(&m, "Subject");
    assert!(v.is_ascii(), "{v}");
    assert_eq!(decode_words(&v), "Hello Zoë, your Zürich update");
    for line in m.split("\r\n") {
        for w in line.split(' ').filter(|w| w.starts_with("=?")) {
            assert!(w.len() <= 75, "{w}");
        }
    }
}

#[test]
fn long_merge_values_in_headers_are_folded() {
    let long = "L".repeat(1200);
    let r = render(
        "Subject: Hello {{ n }}, bye\nTo: \"{{ n }}\" <{{ e }}>\n\nb",
        &["n", "e"],
        "long@example.com",
        &[&long, "long@example.com"],
    )
    .unwrap();
    let m = text(&r);
    assert_wire_clean(&r.bytes);
    let head = m.split("\r\n\r\n").next().unwrap();
    assert!(head.split("\r\n").all(|l| l.len() <= 78), "{head}");
    assert_eq!(
        decode_words(&header_value(&m, "Subject")),
        format!("Hello {long}, bye")
    );
    assert_eq!(
        decode_words(&header_value(&m, "To")),
        format!("{long} <long@example.com>")
    );
}

/// Regression (found by the render fuzz target): white space at the end of a merge value was
/// folded onto a line of its own (a header line of only blanks), and a long run of blanks from
/// merge data made a header line longer than 998 octets.
#[test]
fn blanks_in_header_merge_values_never_make_blank_or_overlong_lines() {
    let tpl = "Subject: =?UTF-8?B?SGk=?= {{ n }}\nX-Note: {{ n }}\nTo: {{ e }}\n\nb";
    let cases = [
        format!("{}   ", "w ".repeat(40)),
        "word\t \t".to_string(),
        format!("a{}b", " ".repeat(2000)),
        format!("a{}b", "\t".repeat(2000)),
        format!("{}x", " ".repeat(1500)),
        " ".repeat(1500),
        "\r\n \r\n ".to_string(),
    ];
    for n in &cases {
        let r = render(tpl, &["n", "e"], "a@example.com", &[n, "a@example.com"]).unwrap();
        assert_wire_clean(&r.bytes);
        let m = text(&r);
        let head = m.split("\r\n\r\n").next().unwrap();
        for line in head.split("\r\n") {
            assert!(
                !line.trim().is_empty(),
                "blank header line for {n:?}:\n{head}"
            );
            assert!(line.len() <= 78, "line of {} octets for {n:?}", line.len());
        }
        assert_eq!(header_names(&m), ["subject", "x-note", "to", "message-id"]);
        // The words survive; only blank runs may shrink.
        let words = |s: &str| s.split_whitespace().map(str::to_string).collect::<Vec<_>>();
        assert_eq!(words(&header_value(&m, "X-Note")), words(n), "{n:?}");
    }
}

#[test]
fn envelope_comes_from_the_recipient_with_idn_and_utf8() {
    let t = "To: {{ e }}\n\nb";
    let r = render(t, &["e"], "user@bücher.example", &["user@bücher.example"]).unwrap();
    assert_eq!(r.envelope_to, "user@xn--bcher-kva.example");
    assert!(!r.needs_smtputf8);
    assert_eq!(header_value(&text(&r), "To"), "user@xn--bcher-kva.example");
    let r = render(t, &["e"], "ñandú@example.com", &["ñandú@example.com"]).unwrap();
    assert_eq!(r.envelope_to, "ñandú@example.com");
    assert!(r.needs_smtputf8 && r.eight_bit);
    let r = render(
        t,
        &["e"],
        "\"odd user\"@example.com",
        &["\"odd user\"@example.com"],
    )
    .unwrap();
    assert_eq!(r.envelope_to, "\"odd user\"@example.com");
    // The header says something else: the envelope still follows the job's recipient.
    let r = render(t, &["e"], "<real@example.com>", &["other@example.com"]).unwrap();
    assert_eq!(r.envelope_to, "real@example.com");
}

#[test]
fn invalid_recipients_are_render_errors() {
    for bad in [
        "not-an-address",
        "missing-domain@",
        "two@@example.com",
        "",
        "a b@example.com",
        "a@exa mple.com",
        "a@-x.com",
        "\"unterminated@example.com",
    ] {
        let e = render("Subject: x\n\nb", &[], bad, &[]).unwrap_err();
        assert!(matches!(e, RenderError::Address { .. }), "{bad:?}: {e}");
    }
}

#[test]
fn body_values_are_normalised() {
    let r = render(
        "Subject: x\n\nA {{ v }} B\n",
        &["v"],
        "a@example.com",
        &["1\n2\r3\r\n4\u{0}5"],
    )
    .unwrap();
    assert!(
        text(&r).ends_with("\r\n\r\nA 1\r\n2\r\n3\r\n45 B\r\n"),
        "{:?}",
        text(&r)
    );
    assert_wire_clean(&r.bytes);
}

#[test]
fn long_body_line_becomes_quoted_printable() {
    let t = "Subject: x\nContent-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: 8bit\n\nHi {{ v }}!\n.dot\n";
    let v = format!("{}é=", "x".repeat(1001));
    let r = render(t, &["v"], "a@example.com", &[&v]).unwrap();
    let m = text(&r);
    assert_wire_clean(&r.bytes);
    assert_eq!(
        header_value(&m, "Content-Transfer-Encoding"),
        "quoted-printable"
    );
    assert_eq!(m.matches("Content-Transfer-Encoding").count(), 1);
    assert!(m.split("\r\n").all(|l| l.len() <= 76), "{m}");
    assert!(m.contains("=C3=A9=3D!\r\n.dot\r\n"), "{m}");
    // Decoding the QP body gives back the original text.
    let body = m.split("\r\n\r\n").nth(1).unwrap();
    assert_eq!(qp_decode(body), format!("Hi {v}!\r\n.dot\r\n"));
}

fn qp_decode(s: &str) -> String {
    let s = s.replace("=\r\n", "");
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
    String::from_utf8(out).unwrap()
}

#[test]
fn long_body_line_without_cte_gets_one() {
    let r = render(
        "Subject: x\n\n{{ v }}",
        &["v"],
        "a@example.com",
        &[&"y".repeat(2000)],
    )
    .unwrap();
    let m = text(&r);
    assert_eq!(
        header_names(&m),
        [
            "subject",
            "content-transfer-encoding",
            "mime-version",
            "message-id"
        ]
    );
    assert_wire_clean(&r.bytes);
}

#[test]
fn long_line_in_multipart_body_is_an_error() {
    let t = "Subject: x\nContent-Type: multipart/mixed; boundary=\"b\"\n\n--b\n\n{{ v }}\n--b--\n";
    let e = render(t, &["v"], "a@example.com", &[&"y".repeat(1000)]).unwrap_err();
    assert!(e.to_string().contains("998"), "{e}");
}

#[test]
fn eight_bit_flag_follows_the_bytes() {
    assert!(
        !render("Subject: x\n\nplain", &[], "a@example.com", &[])
            .unwrap()
            .eight_bit
    );
    assert!(
        render("Subject: x\n\ncafé", &[], "a@example.com", &[])
            .unwrap()
            .eight_bit
    );
}

#[test]
fn dot_lines_survive_rendering() {
    let r = render(
        "Subject: x\n\n.{{ v }}\n.\n..\n",
        &["v"],
        "a@example.com",
        &["test"],
    )
    .unwrap();
    assert!(text(&r).ends_with("\r\n\r\n.test\r\n.\r\n..\r\n"));
}

#[test]
fn quoted_printable_rules() {
    assert_eq!(
        quoted_printable(b"a=b \r\nc\t\r\n"),
        b"a=3Db=20\r\nc=09\r\n"
    );
    let long = quoted_printable(&[b'x'; 200]);
    assert!(long.split(|&b| b == b'\n').all(|l| l.len() <= 77));
}

fn read_campaign() -> (String, Vec<Vec<String>>) {
    let dir = std::path::Path::new("/work/shared/corpus/campaign");
    let template = std::fs::read_to_string(dir.join("template.eml")).unwrap();
    let mut rdr = csv::ReaderBuilder::new()
        .has_headers(false)
        .from_path(dir.join("recipients.csv"))
        .unwrap();
    let rows = rdr
        .records()
        .map(|r| r.unwrap().iter().map(str::to_string).collect())
        .collect();
    (template, rows)
}

#[test]
fn sample_campaign_renders_safely() {
    let (template, rows) = read_campaign();
    let header: Vec<String> = rows[0].clone();
    check_template(&template, &header).unwrap();
    let renderer = Renderer::new(&CampaignSpec {
        campaign_id: 1,
        name: "sample".into(),
        template: template.clone(),
        sender: "news@example.com".into(),
        fields: header.clone(),
    })
    .unwrap();
    let template_fields = header_names(&normalize_crlf(&template));
    let (mut ok, mut refused) = (0, 0);
    for row in &rows[1..] {
        let j = Job {
            job_id: 1,
            lease_id: 1,
            campaign_id: 1,
            attempt: 1,
            recipient: row[0].clone(),
            values: row.clone(),
            message_id: "m@example.com".into(),
        };
        let r = match renderer.render(&j) {
            Ok(r) => r,
            Err(e) => {
                // Only the rows the list marks as invalid may be refused.
                assert!(row[4].contains("invalid"), "{row:?}: {e}");
                refused += 1;
                continue;
            }
        };
        ok += 1;
        let m = text(&r);
        let mut expected = template_fields.clone();
        expected.push("message-id".into());
        assert_eq!(header_names(&m), expected, "{row:?}\n{m}");
        assert_wire_clean(&r.bytes);
        let body = m.split_once("\r\n\r\n").unwrap().1;
        for dot in [
            "\r\n.this line starts with a dot and must arrive with one dot.\r\n",
            "\r\n.\r\n",
            "\r\n..two dots stay two dots.\r\n",
        ] {
            assert!(body.contains(dot), "{row:?}: {dot:?} missing");
        }
        assert!(
            !m.contains("someone@example.net\r\n")
                || !header_names(&m).contains(&"bcc".to_string())
        );
        assert!(
            !r.envelope_to.is_empty() && r.envelope_to.is_ascii() != r.needs_smtputf8,
            "{row:?}"
        );
        let to = decode_words(&header_value(&m, "To"));
        assert!(
            to.contains(&r.envelope_to) || r.envelope_to.contains("xn--"),
            "{to} vs {}",
            r.envelope_to
        );
    }
    assert_eq!(refused, 3);
    assert!(ok >= 20);
}

#[test]
fn corpus_messages_relay_unchanged() {
    for sub in ["rfc", "thirdparty"] {
        let dir = std::path::Path::new("/work/shared/corpus/eml").join(sub);
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().and_then(|e| e.to_str()) != Some("eml") {
                continue;
            }
            let raw = std::fs::read_to_string(&path).unwrap();
            check_template(&raw, &[]).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let r = render(&raw, &[], "a@example.com", &[])
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let want = normalize_crlf(&raw);
            let has_id = header_names(&want).contains(&"message-id".to_string());
            if has_id {
                assert_eq!(text(&r), want, "{}", path.display());
            } else {
                let (h, b) = split_template(&want);
                let mut expected = h.to_string();
                if !expected.is_empty() && !expected.ends_with("\r\n") {
                    expected.push_str("\r\n");
                }
                expected.push_str("Message-ID: <job-7@example.com>\r\n");
                if let Some(b) = b {
                    expected.push_str("\r\n");
                    expected.push_str(b);
                }
                assert_eq!(text(&r), expected, "{}", path.display());
            }
        }
    }
}

#[test]
fn seven_bit_converts_what_it_can_and_names_what_it_cannot() {
    // ASCII is left alone.
    let ascii = b"Subject: x\r\n\r\nhi\r\n";
    assert_eq!(seven_bit(ascii).unwrap(), ascii);
    // 8-bit unstructured header, display name and single-part text body.
    let m = "From: Zoë <zoe@example.com>\r\nSubject: café\r\nX-Note: crème\r\n\r\nUn café\r\n";
    let out = String::from_utf8(seven_bit(m.as_bytes()).unwrap()).unwrap();
    assert!(out.is_ascii(), "{out}");
    assert_wire_clean(out.as_bytes());
    assert_eq!(
        header_value(&out, "From"),
        "=?UTF-8?B?Wm/Dqw==?= <zoe@example.com>"
    );
    assert_eq!(decode_words(&header_value(&out, "Subject")), "café");
    assert_eq!(decode_words(&header_value(&out, "X-Note")), "crème");
    assert_eq!(
        header_value(&out, "Content-Type"),
        "text/plain; charset=utf-8"
    );
    assert_eq!(header_value(&out, "MIME-Version"), "1.0");
    assert_eq!(
        qp_decode(out.split("\r\n\r\n").nth(1).unwrap()),
        "Un café\r\n"
    );
    // An existing 8bit declaration is replaced, not duplicated.
    let m = "Content-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n<p>é</p>\r\n";
    let out = String::from_utf8(seven_bit(m.as_bytes()).unwrap()).unwrap();
    assert_eq!(out.matches("Content-Transfer-Encoding").count(), 1, "{out}");
    assert_eq!(
        header_value(&out, "Content-Type"),
        "text/html; charset=utf-8"
    );

    for (m, want) in [
        (
            "Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n\r\né\r\n--b--\r\n",
            "multipart body contains 8-bit data",
        ),
        (
            "Content-Type: application/octet-stream\r\n\r\n\u{e9}\r\n",
            "the application/octet-stream body contains 8-bit data",
        ),
        (
            "Content-Transfer-Encoding: base64\r\n\r\né\r\n",
            "declared base64 but contains 8-bit data",
        ),
        (
            "To: ñandú@example.com\r\n\r\nx\r\n",
            "the To header field contains 8-bit text",
        ),
        (
            "References: <café@x>\r\n\r\nx\r\n",
            "the References header field contains 8-bit text",
        ),
    ] {
        let e = seven_bit(m.as_bytes()).unwrap_err();
        assert!(e.contains(want), "{m:?}: {e}");
    }
    let e = seven_bit(b"Subject: x\r\n\r\n\xff\xfe\r\n").unwrap_err();
    assert!(e.contains("not UTF-8"), "{e}");
}

#[test]
fn overlong_template_header_line_is_a_template_error() {
    let t = format!("Subject: {}\n\nbody\n", "x".repeat(1000));
    let e = check_template(&t, &[]).unwrap_err();
    assert_eq!(
        e,
        RenderError::Template {
            line: Some(1),
            message: "header line is 1009 octets long, more than the 998 allowed; fold it onto \
                      continuation lines starting with a space"
                .into()
        }
    );
}
