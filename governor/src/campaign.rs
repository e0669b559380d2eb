//! Streaming the recipients CSV and validating rows and addresses.
//!
//! # Theory of operation
//! A recipients file can hold millions of rows and may be hostile or simply broken, so it is never
//! loaded whole: [`Recipients`] drives [`csv_core`] field by field over a fixed-size read buffer
//! and keeps at most `field_max_bytes` of any field. Memory is therefore bounded by
//! `columns x field_max_bytes`, whatever the file holds (a 2 GB unterminated quote included).
//!
//! The first record is the header; it must name an `email` column. Every later record becomes
//! exactly one [`Row`]: [`Row::Valid`] or [`Row::Invalid`] with a reason an operator can act on.
//! A broken row never stops the stream. Only an I/O error ends it early; it is kept for
//! [`Recipients::take_error`] so that ingestion never marks a half-read file as done.
//!
//! Values are passed on raw (CR, LF, NUL included): sanitising them for headers is the worker's
//! job at render time, where it knows which part of the message a value lands in.
//!
//! Duplicates are not detected here but in the spool, which sees every row ever ingested for the
//! campaign (across restarts) - see [`crate::spool::Spool::ingest`].

use std::fs::File;
use std::io::{self, BufRead, BufReader};
use std::path::{Path, PathBuf};

use csv_core::ReadFieldResult;

use crate::spool::{CampaignRow, IngestStats, Spool, SpoolError};

/// Default number of rows per ingestion transaction.
pub const DEFAULT_INGEST_BATCH: usize = 1000;

/// Most columns a header may have; beyond this the file is surely not a recipients list.
const MAX_COLUMNS: usize = 10_000;

/// How much of a bad address is kept for the invalid-rows report.
const RAW_EMAIL_KEEP: usize = 320;

/// Size of the read buffer (the only part of the file held in memory besides one record).
const READ_BUFFER: usize = 64 * 1024;

/// A problem with the recipients file as a whole (row problems are [`Row::Invalid`] instead).
#[derive(Debug, thiserror::Error)]
pub enum CampaignError {
    /// The file could not be opened or read.
    #[error("{}: cannot read recipients file: {}", path.display(), crate::config::io_reason(source))]
    Read {
        /// The recipients file.
        path: PathBuf,
        /// What the OS said.
        source: io::Error,
    },
    /// The file holds no header line.
    #[error(
        "{}: the file is empty; a recipients file needs a header line naming the columns \
         (one of them `email`), then one row per recipient",
        path.display()
    )]
    Empty {
        /// The recipients file.
        path: PathBuf,
    },
    /// The header is unusable (not UTF-8, no `email` column, duplicate or too many columns).
    #[error("{}: line 1 (header): {problem}", path.display())]
    Header {
        /// The recipients file.
        path: PathBuf,
        /// What is wrong and what is required.
        problem: String,
    },
    /// Resuming ingestion found fewer rows than the spool already holds: the file changed.
    #[error(
        "{}: the spool already ingested {expected} rows of this campaign but the file now has only \
         {found}; the file changed since the campaign started: restore it or start a new campaign name",
        path.display()
    )]
    Shrunk {
        /// The recipients file.
        path: PathBuf,
        /// Rows the spool has ingested.
        expected: u64,
        /// Rows the file holds.
        found: u64,
    },
}

/// One data record of the recipients file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Row {
    /// A deliverable row.
    Valid {
        /// 1-based physical line number where the record starts.
        line: u64,
        /// The recipient address (the `email` value with surrounding blanks removed).
        email: String,
        /// All values in [`Recipients::fields`] order, raw (including the `email` value).
        values: Vec<String>,
    },
    /// A row that can not be delivered; reported, never fatal.
    Invalid {
        /// 1-based physical line number where the record starts.
        line: u64,
        /// The `email` value as far as it could be read (lossy UTF-8, truncated), for the report.
        raw_email: String,
        /// Why the row is invalid, for the operator.
        reason: String,
    },
}

impl Row {
    /// The row's 1-based physical start line.
    pub fn line(&self) -> u64 {
        match self {
            Row::Valid { line, .. } | Row::Invalid { line, .. } => *line,
        }
    }
}

/// One record as read, before validation.
struct RawRecord {
    line: u64,
    /// Up to `keep_fields` fields, each truncated to `field_max` bytes.
    fields: Vec<Vec<u8>>,
    /// Total number of fields in the record (may exceed `fields.len()`).
    count: usize,
    /// Index and full length of the first field that was over the limit.
    oversize: Option<(usize, u64)>,
}

/// A streaming reader of a recipients CSV file (RFC 4180; CRLF, LF or CR line ends; optional
/// UTF-8 BOM). Yields one [`Row`] per record after the header.
pub struct Recipients {
    path: PathBuf,
    input: BufReader<File>,
    core: csv_core::Reader,
    scratch: Vec<u8>,
    fields: Vec<String>,
    email_col: usize,
    field_max: usize,
    error: Option<CampaignError>,
    done: bool,
    /// 1-based line of the next unread byte. Counted here, not by csv_core, which counts LF
    /// only: a file with CR line ends would put every row on line 1.
    line: u64,
    /// The last byte read was a CR (so an LF right after it ends no further line).
    after_cr: bool,
}

impl std::fmt::Debug for Recipients {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recipients")
            .field("path", &self.path)
            .field("fields", &self.fields)
            .field("line", &self.line)
            .finish()
    }
}

impl Recipients {
    /// Open `path` and read its header. Fields longer than `field_max_bytes` make their row
    /// invalid (and are never held whole in memory).
    pub fn open(path: &Path, field_max_bytes: usize) -> Result<Recipients, CampaignError> {
        let file = File::open(path).map_err(|source| CampaignError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut r = Recipients {
            path: path.to_path_buf(),
            input: BufReader::with_capacity(READ_BUFFER, file),
            core: csv_core::Reader::new(),
            scratch: vec![0; 8 * 1024],
            fields: Vec::new(),
            email_col: 0,
            field_max: field_max_bytes.max(1),
            error: None,
            done: false,
            line: 1,
            after_cr: false,
        };
        let header = match r.read_raw(MAX_COLUMNS + 1) {
            Ok(Some(h)) => h,
            Ok(None) => return Err(CampaignError::Empty { path: r.path }),
            Err(source) => {
                return Err(CampaignError::Read {
                    path: r.path,
                    source,
                });
            }
        };
        let header_err = |problem: String| CampaignError::Header {
            path: path.to_path_buf(),
            problem,
        };
        if header.count > MAX_COLUMNS {
            return Err(header_err(format!(
                "{} columns; at most {MAX_COLUMNS} are supported",
                header.count
            )));
        }
        if let Some((col, len)) = header.oversize {
            return Err(header_err(format!(
                "column {} name is {len} bytes, over field_max_bytes ({})",
                col + 1,
                r.field_max
            )));
        }
        let mut names = Vec::with_capacity(header.fields.len());
        for (i, raw) in header.fields.into_iter().enumerate() {
            let name = String::from_utf8(raw)
                .map_err(|_| header_err(format!("column {} name is not valid UTF-8", i + 1)))?;
            let name = name.trim().to_string();
            if names.contains(&name) {
                return Err(header_err(format!(
                    "column `{name}` appears twice; column names must be unique"
                )));
            }
            names.push(name);
        }
        let Some(email_col) = names.iter().position(|n| n.eq_ignore_ascii_case("email")) else {
            let looks_like_data = names.iter().any(|n| n.contains('@'));
            let found = names
                .iter()
                .map(|n| format!("`{n}`"))
                .collect::<Vec<_>>()
                .join(", ");
            return Err(header_err(if looks_like_data {
                format!(
                    "no header line (found {found}); the first line must name the columns, \
                     one of them `email`, e.g. `email,first_name`"
                )
            } else {
                format!(
                    "no `email` column (found {found}); the header must name one column `email` \
                     holding the recipient addresses"
                )
            }));
        };
        r.fields = names;
        r.email_col = email_col;
        Ok(r)
    }

    /// The header's column names in order (one of them `email`).
    pub fn fields(&self) -> &[String] {
        &self.fields
    }

    /// Index of the `email` column in [`Recipients::fields`].
    pub fn email_column(&self) -> usize {
        self.email_col
    }

    /// The file being read.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Skip `rows` data records (to resume an interrupted ingestion). Fails if the file has
    /// fewer records than that, since the file then changed since the spool last saw it.
    ///
    /// Named `skip_rows`, not `skip`: method-call syntax would pick `Iterator::skip` (by-value
    /// receiver) over an inherent `skip(&mut self)`.
    pub fn skip_rows(&mut self, rows: u64) -> Result<(), CampaignError> {
        for found in 0..rows {
            match self.read_raw(0) {
                Ok(Some(_)) => {}
                Ok(None) => {
                    return Err(CampaignError::Shrunk {
                        path: self.path.clone(),
                        expected: rows,
                        found,
                    });
                }
                Err(source) => {
                    return Err(CampaignError::Read {
                        path: self.path.clone(),
                        source,
                    });
                }
            }
        }
        Ok(())
    }

    /// The I/O error that ended the stream early, if any. Iteration yields `None` after an I/O
    /// error, so a caller must check this before treating the file as completely read.
    pub fn take_error(&mut self) -> Option<CampaignError> {
        self.error.take()
    }

    /// Read one record, keeping at most `keep_fields` fields of at most `field_max` bytes each.
    /// `Ok(None)` at the end of the file.
    fn read_raw(&mut self, keep_fields: usize) -> io::Result<Option<RawRecord>> {
        // Skip record terminators ourselves so that the start line is that of the record's
        // first byte: csv_core ends a record at CR and consumes the LF of a CRLF only with the
        // next record, which would put every CRLF record one line early.
        loop {
            let buf = self.input.fill_buf()?;
            if buf.is_empty() {
                return Ok(None);
            }
            let n = buf
                .iter()
                .take_while(|&&b| b == b'\r' || b == b'\n')
                .count();
            count_line_ends(&mut self.line, &mut self.after_cr, &buf[..n]);
            let more = n == buf.len();
            self.input.consume(n);
            if !more {
                break;
            }
        }
        let mut rec = RawRecord {
            line: self.line,
            fields: Vec::new(),
            count: 0,
            oversize: None,
        };
        let mut cur: Vec<u8> = Vec::new();
        let mut cur_len: u64 = 0;
        loop {
            let input = self.input.fill_buf()?;
            let (res, nin, nout) = self.core.read_field(input, &mut self.scratch);
            count_line_ends(&mut self.line, &mut self.after_cr, &input[..nin]);
            self.input.consume(nin);
            cur_len += nout as u64;
            if rec.count < keep_fields && cur.len() < self.field_max {
                let room = self.field_max - cur.len();
                cur.extend_from_slice(&self.scratch[..nout.min(room)]);
            }
            match res {
                ReadFieldResult::InputEmpty | ReadFieldResult::OutputFull => {}
                ReadFieldResult::Field { record_end } => {
                    if cur_len > self.field_max as u64 && rec.oversize.is_none() {
                        rec.oversize = Some((rec.count, cur_len));
                    }
                    if rec.count < keep_fields {
                        rec.fields.push(std::mem::take(&mut cur));
                    }
                    rec.count += 1;
                    cur_len = 0;
                    if record_end {
                        return Ok(Some(rec));
                    }
                }
                // Only reachable at EOF with nothing pending, which the skip above rules out;
                // return what we have rather than assume.
                ReadFieldResult::End => {
                    return Ok((rec.count > 0).then_some(rec));
                }
            }
        }
    }

    /// Classify one raw record.
    fn classify(&self, rec: RawRecord) -> Row {
        let line = rec.line;
        let email_name = &self.fields[self.email_col];
        let raw_email = rec
            .fields
            .get(self.email_col)
            .map(|f| truncate_lossy(f, RAW_EMAIL_KEEP))
            .unwrap_or_default();
        let invalid = |reason: String| Row::Invalid {
            line,
            raw_email: raw_email.clone(),
            reason,
        };
        if let Some((col, len)) = rec.oversize {
            let name = self
                .fields
                .get(col)
                .map_or("(extra column)", |s| s.as_str());
            return invalid(format!(
                "field `{name}` is {len} bytes, over field_max_bytes ({})",
                self.field_max
            ));
        }
        if rec.count != self.fields.len() {
            // A quoted field that runs over a line end and leaves the column count wrong is
            // most likely a quote that was never closed: it swallowed the lines after it.
            let spans_lines = rec
                .fields
                .iter()
                .any(|f| f.contains(&b'\n') || f.contains(&b'\r'));
            let hint = if spans_lines {
                "; a quoted field runs over several lines: probably an unclosed `\"` that swallowed the rows after it (fix the quote and run again under a new campaign name)"
            } else {
                ""
            };
            return invalid(format!(
                "wrong number of columns: expected {}, got {}{hint}",
                self.fields.len(),
                rec.count
            ));
        }
        let mut values = Vec::with_capacity(rec.fields.len());
        for (i, raw) in rec.fields.into_iter().enumerate() {
            match String::from_utf8(raw) {
                Ok(s) => values.push(s),
                Err(e) => {
                    return invalid(format!(
                        "invalid UTF-8 in field `{}` at byte {}",
                        self.fields[i],
                        e.utf8_error().valid_up_to()
                    ));
                }
            }
        }
        let email = values[self.email_col].trim_matches([' ', '\t']).to_string();
        if let Err(why) = validate_address(&email) {
            return invalid(format!("bad address in `{email_name}`: {why}"));
        }
        Row::Valid {
            line,
            email,
            values,
        }
    }
}

impl Iterator for Recipients {
    type Item = Row;

    fn next(&mut self) -> Option<Row> {
        if self.done {
            return None;
        }
        match self.read_raw(self.fields.len()) {
            Ok(Some(rec)) => Some(self.classify(rec)),
            Ok(None) => {
                self.done = true;
                None
            }
            Err(source) => {
                self.done = true;
                self.error = Some(CampaignError::Read {
                    path: self.path.clone(),
                    source,
                });
                None
            }
        }
    }
}

/// Advances `line` over `bytes`: CRLF, a lone LF and a lone CR each end one line (csv_core
/// accepts all three as record terminators).
fn count_line_ends(line: &mut u64, after_cr: &mut bool, bytes: &[u8]) {
    for &b in bytes {
        if b == b'\r' || (b == b'\n' && !*after_cr) {
            *line += 1;
        }
        *after_cr = b == b'\r';
    }
}

fn truncate_lossy(bytes: &[u8], max: usize) -> String {
    let s = String::from_utf8_lossy(&bytes[..bytes.len().min(max)]);
    s.into_owned()
}

/// Check that `addr` is a plausible RFC 5321 mailbox (`local@domain`), with the RFC 6531
/// extensions: UTF-8 local parts and IDN (U-label) domains are accepted here; whether the relay
/// supports SMTPUTF8 is decided at delivery. Quoted local parts (`"odd user"@example.com`) and
/// address literals (`user@[192.0.2.1]`) are accepted. The error says why, briefly.
pub fn validate_address(addr: &str) -> Result<(), String> {
    if addr.is_empty() {
        return Err("empty address".into());
    }
    if addr.len() > 254 {
        return Err(format!("{} bytes long, at most 254 allowed", addr.len()));
    }
    let (local, domain) = if let Some(rest) = addr.strip_prefix('"') {
        // Quoted string: qtext or backslash-escaped pairs up to the closing quote.
        let mut chars = rest.char_indices();
        let mut end = None;
        while let Some((i, c)) = chars.next() {
            match c {
                '"' => {
                    end = Some(i);
                    break;
                }
                '\\' => match chars.next() {
                    Some((_, e)) if !e.is_control() => {}
                    _ => return Err("bad escape in quoted local part".into()),
                },
                c if c.is_control() => {
                    return Err("control character in quoted local part".into());
                }
                _ => {}
            }
        }
        let Some(end) = end else {
            return Err("unterminated quoted local part".into());
        };
        let after = &rest[end + 1..];
        let Some(domain) = after.strip_prefix('@') else {
            return Err(if after.contains('@') {
                "text between quoted local part and @".into()
            } else {
                "no @".into()
            });
        };
        (&addr[..end + 2], domain)
    } else {
        let Some((local, domain)) = addr.split_once('@') else {
            return Err("no @".into());
        };
        if domain.contains('@') {
            return Err("two @".into());
        }
        check_dot_atom(local)?;
        (local, domain)
    };
    if local.len() > 64 {
        return Err(format!(
            "local part is {} bytes, at most 64 allowed",
            local.len()
        ));
    }
    check_domain(domain)
}

fn check_dot_atom(local: &str) -> Result<(), String> {
    if local.is_empty() {
        return Err("missing local part".into());
    }
    if local.starts_with('.') || local.ends_with('.') || local.contains("..") {
        return Err("misplaced dot in local part".into());
    }
    for c in local.chars() {
        let ok = c.is_ascii_alphanumeric()
            || "!#$%&'*+-/=?^_`{|}~.".contains(c)
            // RFC 6531 UTF8-non-ascii
            || (!c.is_ascii() && !c.is_control() && !c.is_whitespace());
        if !ok {
            return Err(match c {
                c if c.is_control() => "control character in local part".into(),
                c if c.is_whitespace() => "space in local part (quote it)".into(),
                c => format!("character `{c}` not allowed in local part (quote it)"),
            });
        }
    }
    Ok(())
}

fn check_domain(domain: &str) -> Result<(), String> {
    if domain.is_empty() {
        return Err("missing domain".into());
    }
    if let Some(lit) = domain.strip_prefix('[') {
        let Some(lit) = lit.strip_suffix(']') else {
            return Err("unterminated address literal".into());
        };
        let ok = match lit.strip_prefix("IPv6:") {
            Some(v6) => v6.parse::<std::net::Ipv6Addr>().is_ok(),
            None => lit.parse::<std::net::Ipv4Addr>().is_ok(),
        };
        return if ok {
            Ok(())
        } else {
            Err(format!("bad address literal [{lit}]"))
        };
    }
    if domain.len() > 253 {
        return Err("domain longer than 253 bytes".into());
    }
    for label in domain.split('.') {
        if label.is_empty() {
            return Err("empty label in domain (misplaced dot)".into());
        }
        if label.len() > 63 {
            return Err("domain label longer than 63 bytes".into());
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err("domain label starts or ends with a hyphen".into());
        }
        // ASCII LDH labels, or U-labels (IDN) which are converted to A-labels at delivery.
        if let Some(c) = label.chars().find(|&c| {
            !(c.is_ascii_alphanumeric() || c == '-' || (!c.is_ascii() && c.is_alphanumeric()))
        }) {
            return Err(if c.is_whitespace() || c.is_control() {
                "space or control character in domain".into()
            } else {
                format!("character `{c}` not allowed in domain")
            });
        }
    }
    Ok(())
}

/// An error while ingesting a campaign's recipients into the spool.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// The recipients file failed.
    #[error(transparent)]
    Campaign(#[from] CampaignError),
    /// The spool failed.
    #[error(transparent)]
    Spool(#[from] SpoolError),
}

/// Ingest `recipients` into `campaign`: skip the `rows_ingested` rows the spool already holds
/// (resuming an interrupted start-up exactly), then stream the rest in transactions of `batch`
/// rows (0 means [`DEFAULT_INGEST_BATCH`]). The last batch marks the campaign's ingestion done,
/// and only if the whole file was read without an I/O error. A campaign already done is left
/// alone. Returns what this call added.
pub fn ingest_all(
    spool: &mut Spool,
    campaign: &CampaignRow,
    mut recipients: Recipients,
    batch: usize,
) -> Result<IngestStats, IngestError> {
    let mut stats = IngestStats::default();
    if campaign.ingest_done {
        return Ok(stats);
    }
    let batch = if batch == 0 {
        DEFAULT_INGEST_BATCH
    } else {
        batch
    };
    recipients.skip_rows(campaign.rows_ingested)?;
    let mut ingested = campaign.rows_ingested;
    let mut rows = Vec::with_capacity(batch);
    loop {
        rows.clear();
        rows.extend(recipients.by_ref().take(batch));
        ingested += rows.len() as u64;
        let at_end = rows.len() < batch;
        if at_end && let Some(e) = recipients.take_error() {
            // Keep what was read (exact resume point), but never mark a truncated read done.
            stats += spool.ingest(campaign.id, &rows, ingested, false)?;
            return Err(e.into());
        }
        stats += spool.ingest(campaign.id, &rows, ingested, at_end)?;
        if at_end {
            return Ok(stats);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::io::Write;

    const CORPUS: &str = "/work/shared/corpus/campaign/recipients.csv";

    fn tmp(name: &str, content: &[u8]) -> (PathBuf, TempDir) {
        let dir = TempDir::new(name);
        let p = dir.0.join("r.csv");
        std::fs::write(&p, content).unwrap();
        (p, dir)
    }

    pub(crate) struct TempDir(pub PathBuf);
    impl TempDir {
        pub(crate) fn new(name: &str) -> TempDir {
            let p = std::env::temp_dir().join(format!(
                "governor-test-{name}-{}-{:?}",
                std::process::id(),
                std::thread::current().id()
            ));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            TempDir(p)
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn addresses_table() {
        let valid = [
            "alice@example.com",
            "jane.doe@example.com",
            "UPPER@EXAMPLE.COM",
            "\"odd user\"@example.com",
            "\"a@b\"@example.com",
            "\"esc\\\"aped\"@example.com",
            "ñandú@example.com",
            "user@bücher.example",
            "user@localhost",
            "user+tag@sub.example.co.uk",
            "x@[192.0.2.1]",
            "x@[IPv6:2001:db8::1]",
            "o'brien@example.ie",
        ];
        for a in valid {
            assert_eq!(validate_address(a), Ok(()), "{a}");
        }
        let invalid = [
            ("", "empty address"),
            ("not-an-address", "no @"),
            ("missing-domain@", "missing domain"),
            ("two@@example.com", "two @"),
            ("a@b@example.com", "two @"),
            ("@example.com", "missing local part"),
            (".a@example.com", "misplaced dot in local part"),
            ("a..b@example.com", "misplaced dot in local part"),
            ("a b@example.com", "space in local part (quote it)"),
            ("a@exa mple.com", "space or control character in domain"),
            ("a@example..com", "empty label in domain (misplaced dot)"),
            ("a@example.com.", "empty label in domain (misplaced dot)"),
            (
                "a@-example.com",
                "domain label starts or ends with a hyphen",
            ),
            ("a@ex_ample.com", "character `_` not allowed in domain"),
            ("a\r\nBcc: x@example.com", "control character in local part"),
            ("a\r\n@example.com", "control character in local part"),
            (
                "\"unterminated@example.com",
                "unterminated quoted local part",
            ),
            ("\"q\"x@example.com", "text between quoted local part and @"),
            ("a@[300.1.1.1]", "bad address literal [300.1.1.1]"),
        ];
        for (a, why) in invalid {
            assert_eq!(validate_address(a), Err(why.to_string()), "{a:?}");
        }
        let long_local = format!("{}@example.com", "a".repeat(65));
        assert!(
            validate_address(&long_local)
                .unwrap_err()
                .contains("at most 64")
        );
    }

    /// Every row of the shared corpus is classified as its `note` column says.
    #[test]
    fn corpus_rows_classified_as_noted() {
        let r = Recipients::open(Path::new(CORPUS), 64 * 1024).unwrap();
        assert_eq!(
            r.fields(),
            ["email", "first_name", "last_name", "city", "note"]
        );
        let rows: Vec<Row> = r.collect();
        assert_eq!(rows.len(), 23);
        let mut invalid = Vec::new();
        for row in &rows {
            match row {
                Row::Valid { values, email, .. } => {
                    assert_eq!(values.len(), 5);
                    assert_eq!(&values[0], email);
                    assert!(!values[4].contains("invalid"), "{row:?}");
                }
                Row::Invalid {
                    line,
                    raw_email,
                    reason,
                } => {
                    invalid.push((*line, raw_email.clone(), reason.clone()));
                }
            }
        }
        assert_eq!(
            invalid,
            vec![
                (
                    22,
                    "not-an-address".into(),
                    "bad address in `email`: no @".into()
                ),
                (
                    23,
                    "missing-domain@".into(),
                    "bad address in `email`: missing domain".into()
                ),
                (
                    24,
                    "two@@example.com".into(),
                    "bad address in `email`: two @".into()
                ),
            ]
        );
        let by_note = |note: &str| {
            rows.iter()
                .find_map(|r| match r {
                    Row::Valid { values, line, .. } if values[4] == note => {
                        Some((*line, values.clone()))
                    }
                    _ => None,
                })
                .unwrap_or_else(|| panic!("no valid row noted {note:?}"))
        };
        let (line, v) = by_note("quoted local part, valid");
        assert_eq!((line, v[0].as_str()), (11, "\"odd user\"@example.com"));
        let (line, v) = by_note("CRLF header injection");
        assert_eq!(
            (line, v[1].as_str()),
            (12, "Alice\r\nBcc: someone@example.net")
        );
        let (line, v) = by_note("LF header injection");
        assert_eq!((line, v[1].as_str()), (14, "Bob\nBcc: someone@example.net"));
        let (line, v) = by_note("body injection");
        assert_eq!((line, v[1].as_str()), (16, "Eve\r\n\r\nfake body"));
        assert_eq!(by_note("empty merge fields").0, 19);
        assert_eq!(by_note("very long name").1[1].len(), 1200);
        assert_eq!(by_note("NUL in name").1[1], "Nul\0Name");
        assert_eq!(by_note("tab in name").1[1], "Tab\tName");
        assert_eq!(by_note("quote and backslash").1[1], "Jo \"JJ\" \\ Jones");
        assert_eq!(
            by_note("utf8 local part: needs SMTPUTF8").1[0],
            "ñandú@example.com"
        );
        // Duplicates are the spool's business: both alice rows are valid here.
        assert_eq!(by_note("duplicate address").0, 25);
        assert_eq!(rows.last().unwrap().line(), 28);
    }

    #[test]
    fn empty_file_is_an_error() {
        let (p, _d) = tmp("empty", b"");
        let e = Recipients::open(&p, 100).unwrap_err();
        assert!(matches!(e, CampaignError::Empty { .. }));
        let msg = e.to_string();
        assert!(msg.starts_with(&p.display().to_string()), "{msg}");
        assert!(
            msg.contains("header line") && msg.contains("`email`"),
            "{msg}"
        );
        let (p, _d) = tmp("blank", b"\r\n\n");
        assert!(matches!(
            Recipients::open(&p, 100),
            Err(CampaignError::Empty { .. })
        ));
    }

    #[test]
    fn missing_file_is_an_error() {
        let e = Recipients::open(Path::new("/nonexistent/r.csv"), 100).unwrap_err();
        assert_eq!(
            e.to_string(),
            "/nonexistent/r.csv: cannot read recipients file: No such file or directory"
        );
    }

    #[test]
    fn header_problems() {
        let cases: [(&[u8], &str); 4] = [
            (
                b"name,city\nA,B\n",
                "no `email` column (found `name`, `city`); the header must name one column `email`",
            ),
            (
                b"alice@example.com,Alice\n",
                "no header line (found `alice@example.com`, `Alice`)",
            ),
            (b"email,name,name\n", "column `name` appears twice"),
            (b"email,n\xffame\n", "column 2 name is not valid UTF-8"),
        ];
        for (content, want) in cases {
            let (p, _d) = tmp("header", content);
            let e = Recipients::open(&p, 100).unwrap_err().to_string();
            assert!(e.contains("line 1 (header): ") && e.contains(want), "{e}");
        }
        // BOM and case are tolerated.
        let (p, _d) = tmp("bom", b"\xef\xbb\xbfEmail,name\na@example.com,A\n");
        let r = Recipients::open(&p, 100).unwrap();
        assert_eq!(r.fields(), ["Email", "name"]);
        assert_eq!(r.count(), 1);
    }

    #[test]
    fn ragged_rows_and_bad_utf8_do_not_stop_the_stream() {
        let (p, _d) = tmp(
            "ragged",
            b"name,email\nA,a@example.com\nB\nC,c@example.com,extra\nD\xff,d@example.com\n\nE,e@example.com",
        );
        let rows: Vec<Row> = Recipients::open(&p, 100).unwrap().collect();
        assert_eq!(
            rows,
            vec![
                Row::Valid {
                    line: 2,
                    email: "a@example.com".into(),
                    values: vec!["A".into(), "a@example.com".into()]
                },
                Row::Invalid {
                    line: 3,
                    raw_email: "".into(),
                    reason: "wrong number of columns: expected 2, got 1".into()
                },
                Row::Invalid {
                    line: 4,
                    raw_email: "c@example.com".into(),
                    reason: "wrong number of columns: expected 2, got 3".into()
                },
                Row::Invalid {
                    line: 5,
                    raw_email: "d@example.com".into(),
                    reason: "invalid UTF-8 in field `name` at byte 1".into()
                },
                Row::Valid {
                    line: 7,
                    email: "e@example.com".into(),
                    values: vec!["E".into(), "e@example.com".into()]
                },
            ]
        );
    }

    #[test]
    fn ten_megabyte_field_is_invalid_and_not_held() {
        let d = TempDir::new("bigfield");
        let p = d.0.join("r.csv");
        let mut f = std::io::BufWriter::new(File::create(&p).unwrap());
        f.write_all(b"email,name\r\nbig@example.com,\"").unwrap();
        let chunk = vec![b'x'; 1024 * 1024];
        for _ in 0..10 {
            f.write_all(&chunk).unwrap();
        }
        f.write_all(b"\"\r\nok@example.com,OK\r\n").unwrap();
        drop(f);
        let rows: Vec<Row> = Recipients::open(&p, 64 * 1024).unwrap().collect();
        assert_eq!(
            rows[0],
            Row::Invalid {
                line: 2,
                raw_email: "big@example.com".into(),
                reason: "field `name` is 10485760 bytes, over field_max_bytes (65536)".into()
            }
        );
        assert!(matches!(&rows[1], Row::Valid { line: 3, email, .. } if email == "ok@example.com"));
        assert_eq!(rows.len(), 2);
    }

    #[test]
    fn unterminated_quote_is_one_invalid_row_not_a_crash() {
        let (p, _d) = tmp(
            "unterminated",
            b"email,name\na@example.com,\"open\nb@example.com,B\n",
        );
        let rows: Vec<Row> = Recipients::open(&p, 100).unwrap().collect();
        assert_eq!(rows.len(), 1);
        assert!(
            matches!(&rows[0], Row::Valid { line: 2, values, .. } if values[1] == "open\nb@example.com,B\n")
        );
    }

    /// Regression (found by the recipients_csv fuzz target): with CR line ends every row was
    /// reported on line 1, because only LF was counted.
    #[test]
    fn cr_only_and_mixed_line_ends_number_rows_by_physical_line() {
        let lines = |content: &[u8]| -> Vec<u64> {
            let (p, _d) = tmp("cr-lines", content);
            Recipients::open(&p, 100)
                .unwrap()
                .map(|r| r.line())
                .collect()
        };
        assert_eq!(
            lines(b"email,n\ra@example.com,1\rb@example.com,2\r"),
            [2, 3]
        );
        assert_eq!(
            lines(b"email,n\r\na@x.org,\"q\rq\"\nb@x.org,2\rc@x.org,3\r\n\r\rd@x.org,4"),
            [2, 4, 5, 8]
        );
        // CRLF split across the read buffer still counts once.
        let mut big = b"email,n\r\n".to_vec();
        big.resize(READ_BUFFER, b'\r');
        big.extend_from_slice(b"\na@x.org,1\r\n");
        let (p, _d) = tmp("cr-split", &big);
        let first = Recipients::open(&p, 100).unwrap().next().unwrap();
        assert_eq!(first.line(), 2 + (READ_BUFFER - 9) as u64);
    }

    #[test]
    fn skip_resumes_and_detects_shrunk_files() {
        let (p, _d) = tmp("skip", b"email\r\na@x.org\r\n\"b@x.org\"\r\nc@x.org\r\n");
        let mut r = Recipients::open(&p, 100).unwrap();
        r.skip_rows(2).unwrap();
        let rest: Vec<u64> = r.map(|r| r.line()).collect();
        assert_eq!(rest, vec![4]);
        let mut r = Recipients::open(&p, 100).unwrap();
        let e = r.skip_rows(5).unwrap_err().to_string();
        assert!(
            e.contains("already ingested 5 rows") && e.contains("only 3"),
            "{e}"
        );
    }

    /// Streaming: a large file is read with a bounded buffer. (Structure check: a million rows
    /// go through without ever being collected.)
    #[test]
    fn streams_large_files() {
        let d = TempDir::new("large");
        let p = d.0.join("r.csv");
        let mut f = std::io::BufWriter::new(File::create(&p).unwrap());
        writeln!(f, "email,n").unwrap();
        for i in 0..200_000 {
            writeln!(f, "u{i}@example.com,{i}").unwrap();
        }
        drop(f);
        let r = Recipients::open(&p, 100).unwrap();
        let (mut valid, mut last) = (0, 0);
        for row in r {
            if let Row::Valid { line, .. } = row {
                valid += 1;
                last = line;
            }
        }
        assert_eq!((valid, last), (200_000, 200_001));
    }
}
