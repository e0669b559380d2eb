//! Writing accepted messages to a directory: `<seq>.eml` byte-exact, plus a line in `ledger.jsonl`.
//!
//! The ledger line is written after the message file, so every ledger line names a complete file.
//! Nothing is fsynced: the dump is evidence for tests and demos, not a mail store.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use serde::Serialize;

use super::session::Received;

/// The ledger file's name inside the dump directory.
pub const LEDGER: &str = "ledger.jsonl";

/// One line of `ledger.jsonl` (field order as documented on [`super::SinkOptions::dump`]).
#[derive(Serialize)]
struct LedgerLine<'a> {
    seq: u64,
    mail_from: &'a str,
    rcpt: &'a [String],
    bytes: u64,
    message_id: Option<String>,
    at: u64,
}

/// An open dump directory.
#[derive(Debug)]
pub(crate) struct Dumper {
    dir: PathBuf,
    ledger: Mutex<File>,
}

impl Dumper {
    /// Creates `dir` if needed and opens its ledger for appending (earlier lines are kept).
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        fs::create_dir_all(dir)
            .with_context(|| format!("while creating the dump directory {}", dir.display()))?;
        let path = dir.join(LEDGER);
        let ledger = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("while opening the dump ledger {}", path.display()))?;
        Ok(Dumper {
            dir: dir.to_owned(),
            ledger: Mutex::new(ledger),
        })
    }

    /// Writes message `seq` and its ledger line. Blocking: call from a blocking-capable thread.
    pub fn write(&self, seq: u64, msg: &Received) -> io::Result<()> {
        fs::write(self.dir.join(format!("{seq}.eml")), &msg.data)?;
        let at = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let line = LedgerLine {
            seq,
            mail_from: &msg.mail_from,
            rcpt: &msg.rcpt,
            bytes: msg.size,
            message_id: message_id(&msg.data),
            at,
        };
        let mut bytes = serde_json::to_vec(&line)?;
        bytes.push(b'\n');
        // One write per line on an O_APPEND file: lines from concurrent sessions never interleave.
        let mut ledger = self.ledger.lock().unwrap_or_else(|e| e.into_inner());
        ledger.write_all(&bytes)
    }
}

/// The value of the first `Message-ID` header in the header section, unfolded and trimmed.
pub(crate) fn message_id(data: &[u8]) -> Option<String> {
    let mut value: Option<Vec<u8>> = None;
    for line in data.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            break; // end of the header section
        }
        let folded = line[0] == b' ' || line[0] == b'\t';
        match &mut value {
            Some(v) if folded => v.extend_from_slice(line),
            Some(_) => break,
            None if folded => {}
            None => {
                if let Some(colon) = line.iter().position(|&b| b == b':')
                    && line[..colon]
                        .trim_ascii()
                        .eq_ignore_ascii_case(b"message-id")
                {
                    value = Some(line[colon + 1..].to_vec());
                }
            }
        }
    }
    let value = value?;
    let value = String::from_utf8_lossy(value.trim_ascii()).into_owned();
    (!value.is_empty()).then_some(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_id_is_found_only_in_the_header() {
        let table: &[(&[u8], Option<&str>)] = &[
            (b"Message-ID: <a@b>\r\n\r\nbody\r\n", Some("<a@b>")),
            (b"Subject: x\r\nmessage-id:<a@b>\r\n\r\n", Some("<a@b>")),
            (b"MESSAGE-ID :  <a@b>  \r\nX: y\r\n\r\n", Some("<a@b>")),
            (
                b"Message-ID:\r\n <folded@b>\r\nX: y\r\n",
                Some("<folded@b>"),
            ),
            (b"X: y\r\n Message-ID: <no@b>\r\n\r\n", None),
            (b"Subject: x\r\n\r\nMessage-ID: <body@b>\r\n", None),
            (b"Message-ID: \r\n\r\n", None),
            (b"Message-Id: <lf@b>\nX: y\n\n", Some("<lf@b>")),
            (
                b"Message-ID: <first@b>\r\nMessage-ID: <second@b>\r\n\r\n",
                Some("<first@b>"),
            ),
            (b"", None),
        ];
        for (data, want) in table {
            assert_eq!(
                message_id(data).as_deref(),
                *want,
                "{:?}",
                String::from_utf8_lossy(data)
            );
        }
    }
}
