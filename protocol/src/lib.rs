//! The wire contract between the `governor` and its `mta-worker` processes, and nothing else.
//!
//! # Theory of operation
//! The governor creates a socketpair, keeps one end and hands the other to the worker on file
//! descriptor [`WORKER_FD`]. Both sides then exchange *frames*: a `u32` big-endian payload length
//! followed by a [postcard](https://docs.rs/postcard) payload. The length is checked against
//! [`MAX_FRAME`] before any buffer is allocated, so a hostile or broken peer cannot make the other
//! side allocate 4 GiB.
//!
//! The conversation:
//! 1. worker -> governor: [`ToGovernor::Hello`] with [`PROTOCOL_VERSION`] and its pid.
//! 2. governor -> worker: [`ToWorker::Welcome`] (slot, log file, relay and DKIM settings) or
//!    [`ToWorker::Reject`] when the versions differ (the worker then exits non-zero).
//! 3. governor -> worker: [`ToWorker::Campaign`] once per campaign before the first job of it.
//! 4. governor -> worker: [`ToWorker::Job`], at most `sessions` outstanding; the worker answers
//!    each with exactly one [`ToGovernor::Outcome`].
//! 5. governor -> worker: [`ToWorker::Drain`] (finish what you hold, then exit 0) or
//!    [`ToWorker::Shutdown`] (abort and exit now). EOF on the socket means Shutdown.
//!
//! Compatibility rule: enums only ever gain variants *at the end* and structs never change
//! shape within one [`PROTOCOL_VERSION`]; `tests/fixtures` holds frames the current code must
//! still decode.
#![deny(missing_docs)]

pub mod frame;

pub use frame::{
    FrameDecoder, FrameError, MAX_FRAME, decode_payload, encode, read_frame, write_frame,
};

use serde::{Deserialize, Serialize};

/// Version of this protocol. Bump it whenever a message changes shape.
pub const PROTOCOL_VERSION: u32 = 2;

/// The file descriptor on which a worker finds its end of the IPC socketpair.
pub const WORKER_FD: i32 = 3;

/// Messages from the governor to a worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ToWorker {
    /// Answer to a matching [`ToGovernor::Hello`]: who the worker is and how it delivers.
    Welcome(Welcome),
    /// Answer to a [`ToGovernor::Hello`] whose version differs; the worker must exit non-zero.
    Reject {
        /// Human-readable reason, e.g. "worker speaks protocol 2, governor 1: rebuild both".
        reason: String,
    },
    /// A campaign's template and sender, sent once per worker before its first job of it.
    Campaign(CampaignSpec),
    /// One message to render and deliver. Answered by exactly one [`ToGovernor::Outcome`].
    Job(Job),
    /// Take no new jobs; finish the ones held, send their outcomes, then exit 0.
    Drain,
    /// Abort now: close sessions and exit. Outcomes of unfinished jobs are not sent.
    Shutdown,
}

/// Everything a worker needs to deliver, sent once after the handshake.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Welcome {
    /// The worker's slot number (stable across restarts of the same slot).
    pub slot: u32,
    /// Path of the worker's own log file, `<log_dir>/worker-<slot>.log`.
    pub log_path: String,
    /// Maximum concurrent SMTP sessions this worker may hold.
    pub sessions: u32,
    /// Where and how to deliver.
    pub relay: Relay,
    /// Per-stage network deadlines.
    pub timeouts: Timeouts,
    /// DKIM signing of every message, if configured (added in protocol version 2).
    pub dkim: Option<Dkim>,
}

/// DKIM signing settings (RFC 6376), relaxed/relaxed canonicalization.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct Dkim {
    /// Signing domain (`d=`).
    pub domain: String,
    /// Selector (`s=`): the public key is published at `<selector>._domainkey.<domain>`.
    pub selector: String,
    /// Signature algorithm.
    pub algorithm: DkimAlgorithm,
    /// The private key, PEM (PKCS#8, or PKCS#1 for RSA). A secret: never logged; `Debug`
    /// hides it.
    pub private_key_pem: String,
}

impl std::fmt::Debug for Dkim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dkim")
            .field("domain", &self.domain)
            .field("selector", &self.selector)
            .field("algorithm", &self.algorithm)
            .field("private_key_pem", &"<redacted>")
            .finish()
    }
}

/// DKIM signature algorithm (`a=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DkimAlgorithm {
    /// `rsa-sha256` (RFC 6376).
    RsaSha256,
    /// `ed25519-sha256` (RFC 8463).
    Ed25519Sha256,
}

/// How the worker reaches the next hop.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Relay {
    /// Host name or IP literal of the relay.
    pub host: String,
    /// TCP port of the relay.
    pub port: u16,
    /// Transport security.
    pub tls: TlsMode,
    /// AUTH credentials, if any. Never logged.
    pub auth: Option<Auth>,
    /// Name to announce in EHLO/HELO.
    pub helo: String,
    /// PEM file of extra CA certificates to trust, if any.
    pub ca_file: Option<String>,
    /// Skip certificate verification (testing only; default false).
    pub insecure_skip_verify: bool,
}

/// Transport security towards the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TlsMode {
    /// Plain SMTP, never TLS.
    Off,
    /// STARTTLS when offered; a failed handshake falls back to a fresh plain connection.
    Opportunistic,
    /// STARTTLS required: never downgrade, never send AUTH in clear text.
    Required,
    /// TLS from the first byte (SMTPS, usually port 465).
    Implicit,
}

/// SMTP AUTH credentials.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
pub struct Auth {
    /// User name.
    pub username: String,
    /// Password. Never logged; `Debug` hides it.
    pub password: String,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// Per-stage network deadlines in milliseconds (RFC 5321 4.5.3.2, scaled for bulk).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timeouts {
    /// TCP connect (and TLS handshake).
    pub connect_ms: u32,
    /// The 220 greeting.
    pub greeting_ms: u32,
    /// EHLO/HELO, STARTTLS and AUTH replies.
    pub ehlo_ms: u32,
    /// The reply to MAIL FROM.
    pub mail_ms: u32,
    /// The reply to RCPT TO.
    pub rcpt_ms: u32,
    /// The 354 reply to DATA, and each write of message data.
    pub data_ms: u32,
    /// The reply after the final dot. A timeout here leaves the job *in doubt*.
    pub final_dot_ms: u32,
    /// How long an idle connection is kept for reuse.
    pub idle_ms: u32,
}

impl Default for Timeouts {
    fn default() -> Self {
        // RFC 5321 suggests 5 min for most replies and 10 min after the dot; a bulk sender with
        // thousands of jobs queued is better served by shorter deadlines and a retry.
        Timeouts {
            connect_ms: 10_000,
            greeting_ms: 60_000,
            ehlo_ms: 60_000,
            mail_ms: 60_000,
            rcpt_ms: 60_000,
            data_ms: 120_000,
            final_dot_ms: 300_000,
            idle_ms: 30_000,
        }
    }
}

/// A campaign's template as the worker needs it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CampaignSpec {
    /// Spool id of the campaign.
    pub campaign_id: u64,
    /// Operator's name for the campaign (for logs).
    pub name: String,
    /// Raw RFC 5322 template with `{{ field }}` placeholders.
    pub template: String,
    /// Envelope sender (MAIL FROM), an address without angle brackets.
    pub sender: String,
    /// Names of the merge fields in the order of [`Job::fields`] values.
    pub fields: Vec<String>,
}

/// One message to one recipient.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    /// Spool id of the job.
    pub job_id: u64,
    /// Lease id: the governor only accepts an outcome that quotes the lease it gave.
    pub lease_id: u64,
    /// Campaign this job belongs to (its [`CampaignSpec`] was sent before).
    pub campaign_id: u64,
    /// Attempt number, 1 for the first.
    pub attempt: u32,
    /// Recipient address as given in the list (the worker parses and validates it).
    pub recipient: String,
    /// Merge values, in the order of [`CampaignSpec::fields`].
    pub values: Vec<String>,
    /// Message-ID to use (without angle brackets); the same on every attempt of the job.
    pub message_id: String,
}

/// Messages from a worker to the governor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ToGovernor {
    /// First frame a worker sends.
    Hello {
        /// The worker's [`PROTOCOL_VERSION`].
        version: u32,
        /// The worker's process id.
        pid: u32,
    },
    /// The result of one delivery attempt of a [`Job`].
    Outcome(JobOutcome),
    /// A fatal problem the worker reports before exiting (e.g. a template it cannot compile).
    Fatal {
        /// What went wrong, for the governor's log.
        reason: String,
    },
}

/// What one delivery attempt ended as.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobOutcome {
    /// The job's id.
    pub job_id: u64,
    /// The lease id the job was sent with.
    pub lease_id: u64,
    /// The classification of the attempt.
    pub kind: OutcomeKind,
    /// SMTP reply code, when a server replied (0 when the attempt failed locally or on the network).
    pub code: u16,
    /// Enhanced status code such as `4.7.1`, when the server gave one.
    pub enhanced: Option<String>,
    /// The whole reply text (multi-line replies joined with a space), or the local reason.
    pub text: String,
    /// The SMTP stage at which the attempt ended.
    pub stage: Stage,
    /// Milliseconds from the start of the attempt (session acquired) to its end.
    pub latency_ms: u32,
    /// Index of the SMTP session (within the worker) that carried the attempt.
    pub session: u32,
}

/// Classification of one attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum OutcomeKind {
    /// A 2xx reply after the final dot.
    Delivered,
    /// A temporary failure: retry later.
    Deferred,
    /// A permanent failure: do not retry.
    Bounced,
    /// The answer after the final dot was lost: it may have been delivered; retried and flagged.
    InDoubt,
}

/// SMTP stage at which an attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Stage {
    /// Personalising the message (before any network I/O).
    Render,
    /// TCP connect or TLS handshake.
    Connect,
    /// Waiting for the 220 greeting.
    Greeting,
    /// EHLO/HELO, STARTTLS or AUTH.
    Ehlo,
    /// MAIL FROM.
    Mail,
    /// RCPT TO.
    Rcpt,
    /// DATA command and message transfer.
    Data,
    /// The reply after the final dot.
    FinalDot,
}

#[cfg(test)]
mod tests;
