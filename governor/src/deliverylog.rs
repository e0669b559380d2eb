//! The delivery log (accounting): one JSON line per delivery attempt, appended to
//! `<log_dir>/delivery.jsonl`. It is flushed before the matching spool batch commits, so after a
//! crash the log may show an attempt twice (the replayed one is marked in doubt) but never
//! lacks one the spool knows about.

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::Path;

use serde::Serialize;

/// One attempt, as written.
#[derive(Debug, Clone, Serialize)]
pub struct Attempt<'a> {
    /// Unix time the attempt ended, seconds.
    pub time: f64,
    /// Campaign name.
    pub campaign: &'a str,
    /// Spool job id.
    pub job: u64,
    /// Recipient address as listed.
    pub recipient: &'a str,
    /// Worker slot.
    pub worker: u32,
    /// Worker pid.
    pub pid: u32,
    /// Attempt number, 1-based.
    pub attempt: u32,
    /// delivered | deferred | bounced | in_doubt | expired
    pub outcome: &'a str,
    /// SMTP code, 0 when no server reply.
    pub code: u16,
    /// Enhanced status code.
    pub enhanced: Option<&'a str>,
    /// Full reply text or local reason.
    pub reply: &'a str,
    /// SMTP stage at which the attempt ended.
    pub stage: String,
    /// Attempt latency in ms.
    pub latency_ms: u32,
    /// Message-ID of the message (same on every attempt).
    pub message_id: &'a str,
    /// True when this attempt may duplicate an earlier delivery (the job was in flight at a
    /// crash or its answer after the final dot was lost).
    pub in_doubt: bool,
}

/// Appends attempts to the delivery log.
pub struct DeliveryLog {
    out: BufWriter<File>,
}

impl DeliveryLog {
    /// Opens (creating) the log for appending.
    pub fn open(path: &Path) -> io::Result<Self> {
        let f = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(DeliveryLog {
            out: BufWriter::with_capacity(256 * 1024, f),
        })
    }

    /// Buffers one line.
    pub fn write(&mut self, a: &Attempt<'_>) -> io::Result<()> {
        serde_json::to_writer(&mut self.out, a)?;
        self.out.write_all(b"\n")
    }

    /// Writes buffered lines to the file.
    pub fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}
