//! Personalisation: turns a campaign template and one job's merge values into the exact bytes
//! sent after DATA, plus the envelope recipient.
//!
//! # Theory of operation
//! Merge data is hostile input (FAULTS.md F6-F8), so the template is split into its header block
//! and its body at the first empty line *before* rendering, and each part is rendered with its
//! own escaping:
//! - header values pass through a custom minijinja formatter that replaces control characters
//!   with a space and wraps the value in private-use sentinel characters. After rendering, the
//!   post-processor knows exactly which text came from merge data: header fields without merge
//!   text are copied byte for byte; fields with merge text are re-emitted (address headers
//!   parsed into mailboxes and quoted/encoded properly, other headers RFC 2047 encoded and
//!   folded). Merge text can therefore never add a header field or change address syntax.
//! - body values have their line endings normalised to CRLF and NULs removed.
//!
//! Template text that is not a placeholder comes out byte-identical apart from line endings
//! normalised to CRLF, so a raw message without placeholders is relayed unchanged (the one
//! addition: a `Message-ID` when the template has none, so every attempt of a job carries the
//! same id and duplicates can be recognised).

use std::collections::BTreeSet;
use std::fmt::Write as _;

use minijinja::{AutoEscape, Environment, ErrorKind, UndefinedBehavior, Value};
use protocol::{CampaignSpec, Job};

/// Marks the start of merge text inside a rendered header (Unicode private use area).
const OPEN: char = '\u{E000}';
/// Marks the end of merge text inside a rendered header.
const CLOSE: char = '\u{E001}';
/// Template name of the header block; the formatter uses it to pick header escaping.
const HEADER: &str = "header";
/// Template name of the body.
const BODY: &str = "body";
/// RFC 5322 2.1.1 hard limit for a line, without the CRLF.
const MAX_LINE: usize = 998;
/// RFC 5322 2.1.1 recommended line length that folding aims for.
const FOLD_AT: usize = 78;
/// Headers whose value is an address list and is re-emitted mailbox by mailbox.
const ADDRESS_HEADERS: [&str; 5] = ["from", "to", "cc", "reply-to", "sender"];

/// Why a template or a message could not be rendered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RenderError {
    /// The template itself is wrong (syntax, unknown field, malformed header line).
    #[error("template{}: {message}", line.map(|l| format!(" line {l}")).unwrap_or_default())]
    Template {
        /// 1-based template line, when known.
        line: Option<usize>,
        /// What is wrong and what to do.
        message: String,
    },
    /// The job's recipient (or the campaign's sender) is not a valid address.
    #[error("invalid address {address:?}: {reason}")]
    Address {
        /// The address as given.
        address: String,
        /// Why it was refused.
        reason: String,
    },
    /// The job's merge data produced a message that cannot be sent.
    #[error("{0}")]
    Message(String),
}

/// A message ready for the SMTP transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    /// The message: CRLF line endings, ready for DATA, not dot-stuffed.
    pub bytes: Vec<u8>,
    /// RCPT TO address (IDN domain as A-label), from the job's recipient, never from headers.
    pub envelope_to: String,
    /// The envelope has a non-ASCII local part: the server must offer SMTPUTF8.
    pub needs_smtputf8: bool,
    /// The message contains a byte >= 0x80: the server should offer 8BITMIME.
    pub eight_bit: bool,
}

/// Checks a template at start-up: syntax, placeholders naming unknown fields, header lines.
///
/// The governor calls this before any job is leased so that a broken template stops the
/// campaign with a message naming the line, instead of bouncing every recipient.
pub fn check_template(template: &str, fields: &[String]) -> Result<(), RenderError> {
    Compiled::new(template, fields).map(|_| ())
}

/// A campaign's template compiled once and rendered per job.
pub struct Renderer {
    compiled: Compiled,
    fields: Vec<String>,
    envelope_from: String,
    sender_utf8: bool,
}

impl std::fmt::Debug for Renderer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Renderer")
            .field("fields", &self.fields)
            .field("envelope_from", &self.envelope_from)
            .finish_non_exhaustive()
    }
}

impl Renderer {
    /// Compiles the campaign's template and validates its sender.
    pub fn new(spec: &CampaignSpec) -> Result<Renderer, RenderError> {
        let compiled = Compiled::new(&spec.template, &spec.fields)?;
        // An empty sender is the null reverse-path `MAIL FROM:<>`, legitimate for bulk mail.
        let (envelope_from, sender_utf8) = if spec.sender.trim().is_empty() {
            (String::new(), false)
        } else {
            let a = parse_address(&spec.sender)?;
            (a.to_string(), a.utf8_local)
        };
        Ok(Renderer {
            compiled,
            fields: spec.fields.clone(),
            envelope_from,
            sender_utf8,
        })
    }

    /// The MAIL FROM address (IDN domain as A-label); empty for the null reverse-path.
    pub fn envelope_from(&self) -> &str {
        &self.envelope_from
    }

    /// Renders one job's message.
    pub fn render(&self, job: &Job) -> Result<Rendered, RenderError> {
        let rcpt = parse_address(&job.recipient)?;
        if job.values.len() != self.fields.len() {
            return Err(RenderError::Message(format!(
                "job has {} merge values but the campaign declares {} fields",
                job.values.len(),
                self.fields.len()
            )));
        }
        let ctx = Value::from_pairs(
            self.fields
                .iter()
                .zip(&job.values)
                .map(|(k, v)| (k.as_str(), Value::from(v.as_str()))),
        );
        let c = &self.compiled;
        let header_text = render_part(&c.env, HEADER, &ctx, 0)?;
        let mut header = process_header(&header_text)?;
        let mut body = match c.has_body {
            true => render_part(&c.env, BODY, &ctx, c.body_line_offset)?.into_bytes(),
            false => Vec::new(),
        };

        if body
            .split(|&b| b == b'\n')
            .any(|l| l.strip_suffix(b"\r").unwrap_or(l).len() > MAX_LINE)
        {
            if header.content_type_multipart() {
                return Err(RenderError::Message(
                    "a line of the multipart body is longer than 998 octets after merging; \
                     encode that part in the template (quoted-printable or base64)"
                        .into(),
                ));
            }
            match header.content_transfer_encoding().as_deref() {
                None | Some("7bit") | Some("8bit") | Some("binary") => {}
                Some(other) => {
                    return Err(RenderError::Message(format!(
                        "a line of the {other}-encoded body is longer than 998 octets after merging"
                    )));
                }
            }
            body = quoted_printable(&body);
            header.set_field(
                "content-transfer-encoding",
                "Content-Transfer-Encoding: quoted-printable",
            );
            header.ensure_mime_version();
        }
        if !header.has_field("message-id") {
            let id: String = job
                .message_id
                .chars()
                .filter(|c| !c.is_control() && !matches!(c, '<' | '>' | ' '))
                .collect();
            header.fields.push(format!("Message-ID: <{id}>"));
            header.trailing_crlf = true;
        }

        let mut bytes = header.emit();
        if c.has_body {
            bytes.extend_from_slice(b"\r\n");
            bytes.extend_from_slice(&body);
        }
        let eight_bit = bytes.iter().any(|&b| b >= 0x80);
        Ok(Rendered {
            bytes,
            envelope_to: rcpt.to_string(),
            needs_smtputf8: rcpt.utf8_local || self.sender_utf8,
            eight_bit,
        })
    }
}

/// The two compiled parts of a template.
struct Compiled {
    env: Environment<'static>,
    has_body: bool,
    /// Lines before the body in the template, to report body errors at template lines.
    body_line_offset: usize,
}

impl Compiled {
    fn new(template: &str, fields: &[String]) -> Result<Compiled, RenderError> {
        let normalised = normalize_crlf(template);
        let (header, body) = split_template(&normalised);
        check_header_lines(header)?;
        let body_line_offset = header.matches("\r\n").count() + 1;
        let mut env = environment();
        add_part(&mut env, HEADER, header, 0)?;
        if let Some(body) = body {
            add_part(&mut env, BODY, body, body_line_offset)?;
        }
        let known: BTreeSet<&str> = fields.iter().map(String::as_str).collect();
        let globals: BTreeSet<String> = env.globals().map(|(k, _)| k.to_string()).collect();
        for (name, source, offset) in [
            (HEADER, header, 0),
            (BODY, body.unwrap_or(""), body_line_offset),
        ] {
            let Ok(t) = env.get_template(name) else {
                continue;
            };
            let mut unknown: Vec<String> = t
                .undeclared_variables(false)
                .into_iter()
                .filter(|v| !known.contains(v.as_str()) && !globals.contains(v))
                .collect();
            unknown.sort();
            if let Some(var) = unknown.first() {
                return Err(RenderError::Template {
                    line: find_placeholder_line(source, var).map(|l| l + offset),
                    message: format!(
                        "placeholder `{var}` is not a field of the recipient list (fields: {}); \
                         fix the spelling or add a `{var}` column",
                        fields.join(", ")
                    ),
                });
            }
        }
        Ok(Compiled {
            env,
            has_body: body.is_some(),
            body_line_offset,
        })
    }
}

fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    env.set_auto_escape_callback(|_| AutoEscape::None);
    // minijinja drops one trailing newline by default; relayed messages must stay byte-identical.
    if let Ok(syntax) = minijinja::syntax::SyntaxConfig::builder()
        .keep_trailing_newline(true)
        .build()
    {
        env.set_syntax(syntax);
    }
    env.set_formatter(|out, state, value| {
        if value.is_undefined() {
            return Err(minijinja::Error::new(
                ErrorKind::UndefinedError,
                "undefined value",
            ));
        }
        let text = match value.as_str() {
            Some(s) => s.to_string(),
            None if value.is_none() => String::new(),
            None => value.to_string(),
        };
        let fail = |_| minijinja::Error::new(ErrorKind::WriteFailure, "formatting failed");
        if state.name() == HEADER {
            out.write_char(OPEN).map_err(fail)?;
            out.write_str(&header_safe(&text)).map_err(fail)?;
            out.write_char(CLOSE).map_err(fail)
        } else {
            out.write_str(&body_safe(&text)).map_err(fail)
        }
    });
    env
}

fn add_part(
    env: &mut Environment<'static>,
    name: &'static str,
    source: &str,
    offset: usize,
) -> Result<(), RenderError> {
    env.add_template_owned(name, source.to_string())
        .map_err(|e| template_error(&e, offset))
}

fn template_error(e: &minijinja::Error, offset: usize) -> RenderError {
    RenderError::Template {
        line: e.line().map(|l| l + offset),
        message: match e.detail() {
            Some(d) => format!("{}: {d}", e.kind()),
            None => e.kind().to_string(),
        },
    }
}

fn render_part(
    env: &Environment<'static>,
    name: &str,
    ctx: &Value,
    offset: usize,
) -> Result<String, RenderError> {
    let t = env
        .get_template(name)
        .map_err(|e| template_error(&e, offset))?;
    t.render(ctx).map_err(|e| template_error(&e, offset))
}

/// First template line (1-based) mentioning `var` as a whole word, for error messages.
fn find_placeholder_line(source: &str, var: &str) -> Option<usize> {
    let is_ident = |c: char| c.is_alphanumeric() || c == '_';
    source.split("\r\n").enumerate().find_map(|(i, line)| {
        line.match_indices(var)
            .any(|(at, _)| {
                let before = line[..at].chars().next_back();
                let after = line[at + var.len()..].chars().next();
                !before.is_some_and(is_ident) && !after.is_some_and(is_ident)
            })
            .then_some(i + 1)
    })
}

/// Start-up check of the template's header block, before rendering.
fn check_header_lines(header: &str) -> Result<(), RenderError> {
    if header.is_empty() {
        return Ok(());
    }
    let lines: Vec<&str> = header
        .strip_suffix("\r\n")
        .unwrap_or(header)
        .split("\r\n")
        .collect();
    for (i, line) in lines.iter().enumerate() {
        let line_no = Some(i + 1);
        if line.starts_with([' ', '\t']) {
            if i == 0 {
                return Err(RenderError::Template {
                    line: line_no,
                    message: "the first header line starts with white space (a continuation \
                              line with no header field before it)"
                        .into(),
                });
            }
            continue;
        }
        // F3: a header line cannot be re-encoded; it must fit the RFC 5322 limit as written
        // (lines holding placeholders are folded when rendered).
        if line.len() > MAX_LINE && !line.contains("{{") {
            return Err(RenderError::Template {
                line: line_no,
                message: format!(
                    "header line is {} octets long, more than the 998 allowed; fold it onto \
                     continuation lines starting with a space",
                    line.len()
                ),
            });
        }
        // A line that is only template logic (`{% if x %}...`) is checked after rendering.
        if line.starts_with("{%") || line.starts_with("{#") {
            continue;
        }
        let Some(colon) = line.find(':') else {
            return Err(RenderError::Template {
                line: line_no,
                message: format!(
                    "header line {line:?} has no colon; header fields are `Name: value`, and the \
                     header block ends at the first empty line"
                ),
            });
        };
        let name = line[..colon].trim_end_matches([' ', '\t']);
        if name.is_empty() || !name.bytes().all(|b| (33..=126).contains(&b)) {
            return Err(RenderError::Template {
                line: line_no,
                message: format!(
                    "header field name {name:?} is not valid (printable ASCII, no spaces, no \
                     placeholders)"
                ),
            });
        }
    }
    Ok(())
}

/// Normalises every line ending (CRLF, bare CR, bare LF) to CRLF; idempotent.
pub fn normalize_crlf(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + s.len() / 32);
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\r' => {
                if chars.peek() == Some(&'\n') {
                    chars.next();
                }
                out.push_str("\r\n");
            }
            '\n' => out.push_str("\r\n"),
            c => out.push(c),
        }
    }
    out
}

/// Splits a CRLF template at its first empty line: header block (with its last CRLF) and body.
fn split_template(t: &str) -> (&str, Option<&str>) {
    if let Some(body) = t.strip_prefix("\r\n") {
        return ("", Some(body));
    }
    match t.find("\r\n\r\n") {
        Some(i) => (&t[..i + 2], Some(&t[i + 4..])),
        None => (t, None),
    }
}

/// A header value from merge data: runs of control characters become one space, so a value
/// can never end a header line (F6); the sentinels are reserved for the post-processor.
fn header_safe(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    let mut in_run = false;
    for c in v.chars() {
        if c == OPEN || c == CLOSE {
            continue;
        }
        if (c.is_control() && c != '\t') || c == '\u{2028}' || c == '\u{2029}' {
            if !in_run {
                out.push(' ');
            }
            in_run = true;
        } else {
            out.push(c);
            in_run = false;
        }
    }
    out
}

/// A body value from merge data: line endings normalised to CRLF, NUL removed.
fn body_safe(v: &str) -> String {
    normalize_crlf(&v.replace('\0', ""))
}

/// The rendered header block, one entry per field (continuation lines included, CRLF-joined).
struct Header {
    fields: Vec<String>,
    trailing_crlf: bool,
}

impl Header {
    fn name_of(field: &str) -> &str {
        field.split(':').next().unwrap_or("").trim_end()
    }

    fn find(&self, name: &str) -> Option<usize> {
        self.fields
            .iter()
            .position(|f| Self::name_of(f).eq_ignore_ascii_case(name))
    }

    fn has_field(&self, name: &str) -> bool {
        self.find(name).is_some()
    }

    fn value_of(&self, name: &str) -> Option<String> {
        let f = &self.fields[self.find(name)?];
        let v = &f[f.find(':')? + 1..];
        Some(v.replace("\r\n", "").trim().to_string())
    }

    fn content_type_multipart(&self) -> bool {
        self.value_of("content-type")
            .is_some_and(|v| v.to_ascii_lowercase().starts_with("multipart/"))
    }

    fn content_transfer_encoding(&self) -> Option<String> {
        self.value_of("content-transfer-encoding")
            .map(|v| v.to_ascii_lowercase())
    }

    fn set_field(&mut self, name: &str, line: &str) {
        match self.find(name) {
            Some(i) => self.fields[i] = line.to_string(),
            None => {
                self.fields.push(line.to_string());
                self.trailing_crlf = true;
            }
        }
    }

    /// A Content-Transfer-Encoding only means something in a MIME message (RFC 2045 4).
    fn ensure_mime_version(&mut self) {
        if !self.has_field("mime-version") {
            self.fields.push("MIME-Version: 1.0".into());
            self.trailing_crlf = true;
        }
    }

    fn emit(&self) -> Vec<u8> {
        let mut out = self.fields.join("\r\n").into_bytes();
        if self.trailing_crlf && !self.fields.is_empty() {
            out.extend_from_slice(b"\r\n");
        }
        out
    }
}

/// Splits the rendered header block into fields, drops Bcc, and re-emits fields holding merge
/// text; fields without merge text are kept byte for byte.
fn process_header(text: &str) -> Result<Header, RenderError> {
    let trailing_crlf = text.ends_with("\r\n");
    let body = text.strip_suffix("\r\n").unwrap_or(text);
    let mut raw_fields: Vec<String> = Vec::new();
    if !body.is_empty() {
        for line in body.split("\r\n") {
            match raw_fields.last_mut() {
                Some(last) if line.starts_with([' ', '\t']) => {
                    last.push_str("\r\n");
                    last.push_str(line);
                }
                _ => raw_fields.push(line.to_string()),
            }
        }
    }
    let mut fields = Vec::with_capacity(raw_fields.len() + 1);
    for field in raw_fields {
        let Some(colon) = field.find(':') else {
            return Err(RenderError::Template {
                line: None,
                message: format!(
                    "rendered header line {:?} has no colon",
                    strip_sentinels(&field)
                ),
            });
        };
        let name = &field[..colon];
        if name.contains([OPEN, CLOSE]) || name.trim().is_empty() {
            return Err(RenderError::Template {
                line: None,
                message: format!(
                    "header field name {:?} comes from merge data or is empty",
                    strip_sentinels(name)
                ),
            });
        }
        let lname = name.trim_end().to_ascii_lowercase();
        // F8: a Bcc in the template would disclose the list to every recipient.
        if lname == "bcc" {
            continue;
        }
        if !field.contains(OPEN) {
            fields.push(field);
            continue;
        }
        let value = marked(&field[colon + 1..].replace("\r\n", ""));
        let emitted = if ADDRESS_HEADERS.contains(&lname.as_str()) {
            emit_address_header(name, &value)?
        } else {
            emit_unstructured(name, &value)
        };
        fields.push(emitted);
    }
    Ok(Header {
        fields,
        trailing_crlf,
    })
}

fn strip_sentinels(s: &str) -> String {
    s.chars().filter(|&c| c != OPEN && c != CLOSE).collect()
}

/// Characters of a rendered value, each flagged with whether it came from merge data.
fn marked(s: &str) -> Vec<(char, bool)> {
    let mut out = Vec::with_capacity(s.len());
    let mut in_value = false;
    for c in s.chars() {
        match c {
            OPEN => in_value = true,
            CLOSE => in_value = false,
            c => out.push((c, in_value)),
        }
    }
    out
}

/// A header token for folding: the white space before it and its text.
struct Token {
    ws: String,
    text: String,
}

/// Joins tokens after `Name:` and folds at white space so lines stay within 78 octets where
/// possible (never beyond 998: tokens are at most 76 octets).
///
/// White space comes from merge data too, so two guards (both found by fuzzing): trailing white
/// space (a token without text) is dropped, since after a fold it would make a line of only
/// white space; and a run of white space that would overflow the line is cut to one character,
/// since a value can hold thousands of blanks in a row.
fn fold(name: &str, tokens: &[Token]) -> String {
    let mut out = format!("{name}:");
    let mut line_len = out.len();
    for t in tokens {
        if t.text.is_empty() {
            continue;
        }
        let mut ws = t.ws.as_str();
        if !ws.is_empty() && line_len + ws.len() + t.text.len() > FOLD_AT {
            if line_len > name.len() + 1 {
                out.push_str("\r\n");
                line_len = 0;
            }
            if line_len + ws.len() + t.text.len() > FOLD_AT {
                ws = &ws[..1];
            }
        }
        out.push_str(ws);
        out.push_str(&t.text);
        line_len += ws.len() + t.text.len();
    }
    out
}

/// RFC 2047 B encoded-words for `text`, each at most 75 characters, split on char boundaries.
fn encoded_words(text: &str) -> Vec<String> {
    // "=?UTF-8?B?" + base64 + "?=" <= 75 -> at most 60 base64 chars -> 45 input bytes.
    let mut words = Vec::new();
    let mut chunk = String::new();
    for c in text.chars() {
        if chunk.len() + c.len_utf8() > 45 {
            words.push(format!("=?UTF-8?B?{}?=", base64(chunk.as_bytes())));
            chunk.clear();
        }
        chunk.push(c);
    }
    if !chunk.is_empty() || words.is_empty() {
        words.push(format!("=?UTF-8?B?{}?=", base64(chunk.as_bytes())));
    }
    words
}

fn base64(input: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Re-emits an unstructured (or non-address) header holding merge text: words with non-ASCII,
/// words too long to fold, and merge words that look like encoded-words become encoded-words.
fn emit_unstructured(name: &str, value: &[(char, bool)]) -> String {
    // (leading white space, word, word needs encoding)
    let mut words: Vec<(String, String, bool)> = Vec::new();
    let mut i = 0;
    while i < value.len() {
        let mut ws = String::new();
        while i < value.len() && matches!(value[i].0, ' ' | '\t') {
            ws.push(value[i].0);
            i += 1;
        }
        let mut word = String::new();
        let mut from_value = false;
        while i < value.len() && !matches!(value[i].0, ' ' | '\t') {
            word.push(value[i].0);
            from_value |= value[i].1;
            i += 1;
        }
        let encode = !word.is_ascii()
            || word.len() > 70
            || (from_value && word.contains("=?") && word.contains("?="));
        words.push((ws, word, encode));
    }
    let mut tokens = Vec::new();
    let mut k = 0;
    while k < words.len() {
        let (ws, word, encode) = &words[k];
        if !encode {
            tokens.push(Token {
                ws: ws.clone(),
                text: word.clone(),
            });
            k += 1;
            continue;
        }
        // Adjacent encoded-words are joined without the space between them when decoded, so a
        // run of words to encode is encoded as one text, spaces included.
        let mut run = word.clone();
        k += 1;
        while k < words.len() && words[k].2 {
            run.push_str(&words[k].0);
            run.push_str(&words[k].1);
            k += 1;
        }
        for (j, w) in encoded_words(&run).into_iter().enumerate() {
            // An encoded-word must be separated from what precedes it by white space (RFC
            // 2047 5), even where the template wrote `Subject:{{ x }}`.
            let ws = if j > 0 || ws.is_empty() {
                " ".to_string()
            } else {
                ws.clone()
            };
            tokens.push(Token { ws, text: w });
        }
    }
    fold(name, &tokens)
}

/// One mailbox of an address header after merging.
struct Mailbox {
    name: String,
    addr: String,
}

/// Re-emits an address header holding merge text. Merge text is always literal (a quote or a
/// comma in a name is part of the name), template text supplies the syntax.
fn emit_address_header(name: &str, value: &[(char, bool)]) -> Result<String, RenderError> {
    let err = |m: String| RenderError::Message(format!("{} header: {m}", name.trim()));
    let mut boxes: Vec<Mailbox> = Vec::new();
    let (mut display, mut addr) = (String::new(), String::new());
    let (mut in_quote, mut in_angle, mut saw_angle) = (false, false, false);
    let mut finish = |display: &mut String, addr: &mut String, saw_angle: bool| {
        let d = std::mem::take(display);
        let a = std::mem::take(addr);
        if saw_angle {
            boxes.push(Mailbox { name: d, addr: a });
        } else if !d.trim().is_empty() {
            boxes.push(Mailbox {
                name: String::new(),
                addr: d,
            });
        }
    };
    let mut it = value.iter().peekable();
    while let Some(&(c, from_value)) = it.next() {
        let target = if in_angle { &mut addr } else { &mut display };
        if from_value {
            target.push(c);
            continue;
        }
        if in_quote {
            match c {
                '\\' => {
                    if let Some(&(n, _)) = it.next() {
                        if in_angle {
                            target.push('\\');
                        }
                        target.push(n);
                    }
                }
                '"' => {
                    in_quote = false;
                    if in_angle {
                        target.push('"');
                    }
                }
                c => target.push(c),
            }
            continue;
        }
        match c {
            '"' => {
                in_quote = true;
                if in_angle {
                    addr.push('"');
                }
            }
            '<' if !in_angle => {
                in_angle = true;
                saw_angle = true;
            }
            '>' if in_angle => in_angle = false,
            ',' if !in_angle => {
                finish(&mut display, &mut addr, saw_angle);
                saw_angle = false;
            }
            ':' | ';' if !in_angle => {
                return Err(err(
                    "group syntax is not supported in a header with merge fields".into(),
                ));
            }
            c => target.push(c),
        }
    }
    if in_quote || in_angle {
        return Err(err("unbalanced quote or angle bracket".into()));
    }
    finish(&mut display, &mut addr, saw_angle);
    if boxes.is_empty() {
        return Err(err("no address after merging".into()));
    }

    let mut tokens: Vec<Token> = Vec::new();
    let n = boxes.len();
    for (i, b) in boxes.into_iter().enumerate() {
        let a = parse_address(&b.addr).map_err(|e| err(e.to_string()))?;
        let display_name = b.name.split_whitespace().collect::<Vec<_>>().join(" ");
        let sep = if i + 1 < n { "," } else { "" };
        if display_name.is_empty() {
            tokens.push(Token {
                ws: " ".into(),
                text: format!("{a}{sep}"),
            });
            continue;
        }
        for w in phrase(&display_name) {
            tokens.push(Token {
                ws: " ".into(),
                text: w,
            });
        }
        tokens.push(Token {
            ws: " ".into(),
            text: format!("<{a}>{sep}"),
        });
    }
    Ok(fold(name, &tokens))
}

/// A display name as RFC 5322 phrase tokens: atoms as they are, otherwise one quoted-string,
/// or RFC 2047 encoded-words (never inside quotes) when non-ASCII or too long to fold.
fn phrase(name: &str) -> Vec<String> {
    let atext = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-/=?^_`{|}~".contains(c);
    let quoted_len = name.len() + 2 + name.chars().filter(|c| matches!(c, '"' | '\\')).count();
    if !name.is_ascii() || quoted_len > 76 || name.contains("=?") {
        return encoded_words(name);
    }
    if name
        .split(' ')
        .all(|w| !w.is_empty() && w.chars().all(atext))
    {
        return vec![name.to_string()];
    }
    let mut q = String::from("\"");
    for c in name.chars() {
        if matches!(c, '"' | '\\') {
            q.push('\\');
        }
        q.push(c);
    }
    q.push('"');
    vec![q]
}

/// A parsed and validated address: local part as given, domain as an A-label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Address {
    /// Local part (a dot-atom or a quoted-string, quotes included).
    pub local: String,
    /// Domain, IDN converted to A-labels (or an address literal `[...]`).
    pub domain: String,
    /// The local part has non-ASCII characters: SMTPUTF8 is needed.
    pub utf8_local: bool,
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.local, self.domain)
    }
}

/// Parses an addr-spec (optionally in angle brackets) as given in a recipient list.
pub fn parse_address(input: &str) -> Result<Address, RenderError> {
    let bad = |reason: &str| RenderError::Address {
        address: input.to_string(),
        reason: reason.into(),
    };
    let s = input.trim();
    let s = s
        .strip_prefix('<')
        .and_then(|s| s.strip_suffix('>'))
        .unwrap_or(s);
    if s.is_empty() {
        return Err(bad("empty address"));
    }
    if s.chars().any(|c| c.is_control()) {
        return Err(bad("control character in address"));
    }
    let (local, domain) = if s.starts_with('"') {
        let mut end = None;
        let mut escaped = false;
        for (i, c) in s.char_indices().skip(1) {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => {
                    end = Some(i);
                    break;
                }
                _ => {}
            }
        }
        let end = end.ok_or_else(|| bad("unterminated quoted local part"))?;
        let rest = &s[end + 1..];
        let domain = rest
            .strip_prefix('@')
            .ok_or_else(|| bad("missing @ after quoted local part"))?;
        (&s[..=end], domain)
    } else {
        let at = s.rfind('@').ok_or_else(|| bad("missing @"))?;
        let local = &s[..at];
        let atext = |c: char| {
            c.is_ascii_alphanumeric() || !c.is_ascii() || "!#$%&'*+-/=?^_`{|}~".contains(c)
        };
        if local.is_empty() {
            return Err(bad("empty local part"));
        }
        if !local
            .split('.')
            .all(|a| !a.is_empty() && a.chars().all(atext))
        {
            return Err(bad("local part is not a valid dot-atom (quote it?)"));
        }
        (local, &s[at + 1..])
    };
    if local.len() > 64 {
        return Err(bad("local part longer than 64 octets"));
    }
    if domain.is_empty() {
        return Err(bad("missing domain"));
    }
    let domain = if domain.starts_with('[') {
        if !domain.ends_with(']') || domain.contains(char::is_whitespace) {
            return Err(bad("malformed address literal"));
        }
        domain.to_string()
    } else {
        let ascii = idna::domain_to_ascii(domain).map_err(|_| bad("domain is not a valid IDN"))?;
        let ok_label = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        };
        if ascii.len() > 253 || !ascii.split('.').all(ok_label) {
            return Err(bad("domain is not a valid host name"));
        }
        ascii
    };
    Ok(Address {
        local: local.to_string(),
        domain,
        utf8_local: !local.is_ascii(),
    })
}

/// Header fields whose value is unstructured text (RFC 5322 3.6.5, RFC 2045 8) and may carry
/// RFC 2047 encoded-words.
const UNSTRUCTURED_HEADERS: [&str; 4] = ["subject", "comments", "content-description", "keywords"];

/// The 7-bit-clean form of a rendered message, for a server that does not offer 8BITMIME
/// (F4): 8-bit header text becomes RFC 2047 encoded-words (unstructured fields and display
/// names) and an 8-bit single-part text body becomes quoted-printable. Anything that cannot
/// be converted without changing its meaning (a multipart body, a non-text body, a non-ASCII
/// address, 8-bit data in another structured field) is an error naming what to fix.
///
/// `msg` is a message as [`Renderer::render`] makes it: CRLF line endings.
pub fn seven_bit(msg: &[u8]) -> Result<Vec<u8>, String> {
    if msg.is_ascii() {
        return Ok(msg.to_vec());
    }
    let (head, body) = if let Some(b) = msg.strip_prefix(b"\r\n") {
        (&msg[..0], Some(b))
    } else {
        match msg.windows(4).position(|w| w == b"\r\n\r\n") {
            Some(i) => (&msg[..i + 2], Some(&msg[i + 4..])),
            None => (msg, None),
        }
    };
    let head = std::str::from_utf8(head)
        .map_err(|_| "a header field contains 8-bit data that is not UTF-8".to_string())?;
    let trailing_crlf = head.ends_with("\r\n");
    let mut fields: Vec<String> = Vec::new();
    for line in head.strip_suffix("\r\n").unwrap_or(head).split("\r\n") {
        match fields.last_mut() {
            Some(last) if line.starts_with([' ', '\t']) => {
                last.push_str("\r\n");
                last.push_str(line);
            }
            _ if line.is_empty() => {}
            _ => fields.push(line.to_string()),
        }
    }
    let mut header = Header {
        fields: Vec::with_capacity(fields.len() + 3),
        trailing_crlf,
    };
    for field in fields {
        if field.is_ascii() {
            header.fields.push(field);
            continue;
        }
        let colon = field.find(':').unwrap_or(0);
        let name = &field[..colon];
        let lname = name.trim_end().to_ascii_lowercase();
        let value: Vec<(char, bool)> = field[colon + 1..]
            .replace("\r\n", "")
            .chars()
            .map(|c| (c, false))
            .collect();
        let cannot = || {
            format!(
                "the {} header field contains 8-bit text that cannot be made 7-bit clean for a \
                 server without 8BITMIME",
                name.trim()
            )
        };
        let emitted = if ADDRESS_HEADERS.contains(&lname.as_str()) {
            emit_address_header(name, &value).map_err(|e| format!("{}: {e}", cannot()))?
        } else if UNSTRUCTURED_HEADERS.contains(&lname.as_str()) || lname.starts_with("x-") {
            emit_unstructured(name, &value)
        } else {
            return Err(cannot());
        };
        if !emitted.is_ascii() {
            // e.g. an address with a non-ASCII local part: that needs SMTPUTF8, not MIME.
            return Err(cannot());
        }
        header.fields.push(emitted);
    }
    let mut body = body.map(<[u8]>::to_vec);
    if let Some(b) = body.as_mut().filter(|b| !b.is_ascii()) {
        if header.content_type_multipart() {
            return Err(
                "the multipart body contains 8-bit data and the server does not offer \
                        8BITMIME; encode its parts (quoted-printable or base64) in the template"
                    .into(),
            );
        }
        if let Some(ct) = header.value_of("content-type")
            && !ct.to_ascii_lowercase().starts_with("text/")
        {
            return Err(format!(
                "the {} body contains 8-bit data and the server does not offer 8BITMIME; \
                 base64-encode it in the template",
                ct.split(';').next().unwrap_or("").trim()
            ));
        }
        match header.content_transfer_encoding().as_deref() {
            None | Some("7bit") | Some("8bit") | Some("binary") => {}
            Some(other) => {
                return Err(format!(
                    "the body is declared {other} but contains 8-bit data; fix the template"
                ));
            }
        }
        if !header.has_field("content-type") {
            if std::str::from_utf8(b).is_err() {
                return Err("the body contains 8-bit data that is not UTF-8 and has no \
                            Content-Type charset; the server does not offer 8BITMIME"
                    .into());
            }
            header
                .fields
                .push("Content-Type: text/plain; charset=utf-8".into());
            header.trailing_crlf = true;
        }
        *b = quoted_printable(b);
        header.set_field(
            "content-transfer-encoding",
            "Content-Transfer-Encoding: quoted-printable",
        );
        header.ensure_mime_version();
    }
    let mut out = header.emit();
    if let Some(b) = body {
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(&b);
    }
    debug_assert!(out.is_ascii());
    Ok(out)
}

/// Quoted-printable (RFC 2045 6.7) of a CRLF body: hard line breaks kept, lines at most 76.
pub fn quoted_printable(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + body.len() / 8);
    let mut lines = body.split(|&b| b == b'\n').peekable();
    while let Some(line) = lines.next() {
        let last_line = lines.peek().is_none();
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let mut len = 0;
        for (i, &b) in line.iter().enumerate() {
            let at_end = i + 1 == line.len();
            let literal = (b == b'\t' || (32..127).contains(&b))
                && b != b'='
                && !(at_end && (b == b' ' || b == b'\t'));
            let piece_len = if literal { 1 } else { 3 };
            if len + piece_len > 75 {
                out.extend_from_slice(b"=\r\n");
                len = 0;
            }
            if literal {
                out.push(b);
            } else {
                let _ = write!(HexSink(&mut out), "={b:02X}");
            }
            len += piece_len;
        }
        if !last_line {
            out.extend_from_slice(b"\r\n");
        }
    }
    out
}

/// Adapts a byte vector to `fmt::Write` for the hex escapes above.
struct HexSink<'a>(&'a mut Vec<u8>);

impl std::fmt::Write for HexSink<'_> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

#[cfg(test)]
mod tests;
