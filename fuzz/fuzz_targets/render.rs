//! Template rendering with hostile merge data.
//!
//! Input: the first byte picks one of a few fixed templates (the shared corpus template among
//! them); the rest, as (lossy) UTF-8 split at U+001F, is the recipient followed by the merge
//! values (padded with empty values or cut to the template's field count). Templates are fixed
//! because a template is the operator's and is checked at start-up; merge data and recipients
//! come from a list that may be hostile.
//!
//! Invariants: never a panic; an error is an address or message error, never a template error
//! (merge data cannot break the template); rendering is deterministic; on success the header
//! block has exactly the template's header fields in order, minus `Bcc`, plus
//! `Content-Transfer-Encoding` (and `MIME-Version` if missing) when a long merged body line
//! forced quoted-printable, plus
//! `Message-ID` when the template had none; no bare CR or LF anywhere; no line over 998 octets;
//! no header line of only white space; no NUL and no internal sentinel character in the header;
//! the envelope recipient has no control characters.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mta_worker::render::{RenderError, Renderer};
use protocol::{CampaignSpec, Job};

const TEMPLATES: [(&str, &[&str]); 5] = [
    (
        include_str!("templates/corpus.eml"),
        &["email", "first_name", "last_name", "city", "note"],
    ),
    (
        include_str!("templates/addresses.eml"),
        &["email", "name", "note"],
    ),
    (
        include_str!("templates/body.eml"),
        &["email", "name", "note"],
    ),
    (
        include_str!("templates/multipart.eml"),
        &["email", "name", "note"],
    ),
    (
        include_str!("templates/quoted.eml"),
        &["email", "name", "note"],
    ),
];

/// Header field names of a template (before its first empty line), as written.
fn template_names(t: &str) -> Vec<String> {
    let t = t.replace("\r\n", "\n");
    t.split('\n')
        .take_while(|l| !l.is_empty())
        .filter(|l| !l.starts_with([' ', '\t']))
        .map(|l| l.split(':').next().unwrap_or("").trim_end().to_string())
        .collect()
}

fn check_lines(bytes: &[u8]) {
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            b'\r' => assert_eq!(bytes.get(i + 1), Some(&b'\n'), "bare CR at {i}"),
            b'\n' => {
                assert!(i > 0 && bytes[i - 1] == b'\r', "bare LF at {i}");
                let len = i - 1 - start;
                assert!(len <= 998, "line of {len} octets at {start}");
                start = i + 1;
            }
            _ => {}
        }
    }
    assert!(bytes.len() - start <= 998, "last line over 998 octets");
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let (template, fields) = TEMPLATES[usize::from(pick) % TEMPLATES.len()];
    let text = String::from_utf8_lossy(rest);
    let mut parts = text.split('\u{1F}');
    let recipient = parts.next().unwrap_or("").to_string();
    let mut values: Vec<String> = parts.map(str::to_string).collect();
    values.resize(fields.len(), String::new());

    let spec = CampaignSpec {
        campaign_id: 1,
        name: "fuzz".into(),
        template: template.into(),
        sender: "bounces@example.com".into(),
        fields: fields.iter().map(|f| f.to_string()).collect(),
    };
    let renderer = Renderer::new(&spec).expect("the fixed templates compile");
    let job = Job {
        job_id: 1,
        lease_id: 1,
        campaign_id: 1,
        attempt: 1,
        recipient,
        values,
        message_id: "fuzz.2.0123abcd@example.com".into(),
    };
    let out = match renderer.render(&job) {
        Ok(out) => out,
        Err(e @ RenderError::Template { .. }) => panic!("merge data broke the template: {e}"),
        Err(RenderError::Address { .. } | RenderError::Message(_)) => return,
    };
    assert_eq!(
        renderer.render(&job).as_ref(),
        Ok(&out),
        "not deterministic"
    );

    let bytes = &out.bytes;
    check_lines(bytes);
    let header_len = bytes
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| i + 2)
        .expect("every fixed template has a body");
    let header = std::str::from_utf8(&bytes[..header_len]).expect("header is UTF-8");
    assert!(
        !header.contains(['\0', '\u{E000}', '\u{E001}']),
        "{header:?}"
    );
    let mut got = Vec::new();
    for line in header.strip_suffix("\r\n").unwrap_or(header).split("\r\n") {
        assert!(
            !line.trim_matches([' ', '\t']).is_empty(),
            "header line of only white space in {header:?}"
        );
        if !line.starts_with([' ', '\t']) {
            let name = line.split(':').next().unwrap_or("");
            assert!(line.contains(':'), "header line without a colon: {line:?}");
            got.push(name.trim_end().to_string());
        }
    }
    let mut want: Vec<String> = template_names(template)
        .into_iter()
        .filter(|n| !n.eq_ignore_ascii_case("bcc"))
        .collect();
    let has = |names: &[String], n: &str| names.iter().any(|x| x.eq_ignore_ascii_case(n));
    if !has(&want, "content-transfer-encoding")
        && header.contains("\r\nContent-Transfer-Encoding: quoted-printable\r\n")
    {
        want.push("Content-Transfer-Encoding".into());
        // A Content-Transfer-Encoding needs a MIME-Version (RFC 2045 4).
        if !has(&want, "mime-version") {
            want.push("MIME-Version".into());
        }
    }
    if !has(&want, "message-id") {
        want.push("Message-ID".into());
    }
    assert_eq!(
        got, want,
        "header fields differ from the template's\n{header}"
    );
    assert!(
        !out.envelope_to.chars().any(char::is_control),
        "control character in envelope recipient {:?}",
        out.envelope_to
    );
});
