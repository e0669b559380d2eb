//! SMTP sessions towards the relay: a pool of up to `sessions` connections reused across jobs.
//!
//! # Theory of operation
//! mail-send's `send()` neither pipelines nor sends RSET and stops at the first refused RCPT,
//! so the transaction is driven here with its low-level `SmtpClient` calls. Every network await
//! has a deadline from [`Timeouts`] (mail-send's own default is one hour and its plain connect
//! has no greeting deadline): the client's per-call timeout is set to the stage's deadline and
//! the call is also wrapped in `tokio::time::timeout`.
//!
//! A connection is reused only when the attempt left it in a known state: after a failed
//! transaction it must answer RSET with 250 before the next MAIL (F12); after a 421, a timeout
//! or an I/O error it is closed (F10). The message is dot-stuffed here, exactly once
//! ([`dot_stuff`]), instead of by mail-send's `data()`, whose framing appends an extra CRLF to
//! a message that already ends in one (the receiver would store one more empty line).
//!
//! What is sent depends on the server: a message with 8-bit data goes to a server without
//! 8BITMIME in its 7-bit form ([`crate::render::seven_bit`], F4) or not at all. The chosen
//! bytes are then normalised to CRLF, checked against the 998-octet line limit (F3), and
//! DKIM-signed ([`crate::dkim`]): the signature covers exactly the bytes on the wire.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mail_send::{Credentials, SmtpClient};
use protocol::{Relay, Stage, Timeouts, TlsMode};
use smtp_proto::{
    AUTH_LOGIN, AUTH_PLAIN, EXT_8BIT_MIME, EXT_PIPELINING, EXT_SMTP_UTF8, EXT_START_TLS,
    EhloResponse,
};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_rustls::TlsConnector;

use crate::dkim::Signer;
use crate::outcome::{Classified, Event, Reply, classify};
use crate::render::{Rendered, seven_bit};

/// A byte stream that is either plain TCP or TLS.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

type Client = SmtpClient<Box<dyn Io>>;

/// One open SMTP connection and what its EHLO announced.
struct Conn {
    client: Client,
    ehlo: EhloResponse<String>,
    /// The last transaction failed: RSET (and its 250) is owed before the next MAIL.
    needs_rset: bool,
    last_used: Instant,
}

/// A session slot: its index (reported in outcomes) and its connection, if one is open.
struct Slot {
    index: u32,
    conn: Option<Conn>,
}

/// The result of one delivery attempt.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The classified outcome.
    pub outcome: Classified,
    /// Index of the session that carried it.
    pub session: u32,
}

/// Up to `sessions` SMTP connections to one relay, reused across jobs.
pub struct Pool {
    relay: Relay,
    timeouts: Timeouts,
    tls: Option<TlsConnector>,
    permits: Semaphore,
    slots: Mutex<Vec<Slot>>,
    dkim: Option<Signer>,
}

fn ms(v: u32) -> Duration {
    Duration::from_millis(u64::from(v.max(1)))
}

impl Pool {
    /// A pool for `relay`; builds the TLS configuration once (fails on an unreadable CA file).
    pub fn new(relay: Relay, timeouts: Timeouts, sessions: u32) -> anyhow::Result<Pool> {
        let sessions = sessions.max(1);
        let tls = match relay.tls {
            TlsMode::Off => None,
            _ => Some(tls_connector(&relay)?),
        };
        Ok(Pool {
            relay,
            timeouts,
            tls,
            permits: Semaphore::new(sessions as usize),
            slots: Mutex::new(
                (0..sessions)
                    .map(|index| Slot { index, conn: None })
                    .collect(),
            ),
            dkim: None,
        })
    }

    /// Signs every message with `signer` from now on.
    pub fn with_dkim(mut self, signer: Signer) -> Pool {
        self.dkim = Some(signer);
        self
    }

    /// Delivers one rendered message from `sender` (empty for `<>`).
    pub async fn deliver(&self, sender: &str, msg: &Rendered) -> Delivery {
        let Ok(_permit) = self.permits.acquire().await else {
            // The semaphore is never closed; this keeps the function total anyway.
            let outcome = classify(&Event::Local {
                stage: Stage::Connect,
                detail: "session pool closed".into(),
                permanent: false,
            });
            return Delivery {
                outcome,
                session: 0,
            };
        };
        let mut slot = self.take_slot();
        let session = slot.index;
        let (event, conn) = self.attempt(slot.conn.take(), session, sender, msg).await;
        let outcome = classify(&event);
        if let Some(mut conn) = conn.filter(|_| outcome.reusable) {
            // A refusal decided before MAIL was sent leaves no transaction to reset.
            let no_transaction = matches!(
                event,
                Event::Smtputf8NotOffered { .. }
                    | Event::EightBitNotOffered { .. }
                    | Event::Unsendable { .. }
            );
            conn.needs_rset = outcome.kind != protocol::OutcomeKind::Delivered && !no_transaction;
            conn.last_used = Instant::now();
            slot.conn = Some(conn);
        } else {
            log::debug!(
                "session={session} closing connection after {:?}",
                outcome.kind
            );
        }
        self.put_slot(slot);
        Delivery { outcome, session }
    }

    /// Sends QUIT on idle connections and closes them (on drain and shutdown).
    pub async fn close_idle(&self) {
        let conns: Vec<Conn> = {
            let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
            slots.iter_mut().filter_map(|s| s.conn.take()).collect()
        };
        for mut c in conns {
            c.client.timeout = ms(self.timeouts.ehlo_ms.min(2_000));
            let _ = tokio::time::timeout(c.client.timeout, c.client.quit()).await;
        }
    }

    fn take_slot(&self) -> Slot {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        // Prefer a slot with a live connection: reuse is the point of the pool.
        let i = slots.iter().position(|s| s.conn.is_some()).unwrap_or(0);
        slots.swap_remove(i)
    }

    fn put_slot(&self, slot: Slot) {
        self.slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(slot);
    }

    /// Runs one attempt; returns what ended it and the connection if it is still open.
    async fn attempt(
        &self,
        conn: Option<Conn>,
        session: u32,
        sender: &str,
        msg: &Rendered,
    ) -> (Event, Option<Conn>) {
        let idle = ms(self.timeouts.idle_ms);
        let mut reused = None;
        if let Some(mut c) = conn {
            if c.last_used.elapsed() > idle {
                c.client.timeout = ms(self.timeouts.ehlo_ms.min(2_000));
                let _ = tokio::time::timeout(c.client.timeout, c.client.quit()).await;
            } else if c.needs_rset {
                // F12: the failed transaction is reset before the next MAIL, or the
                // connection is not used again.
                c.client.timeout = ms(self.timeouts.mail_ms);
                let ok = matches!(
                    tokio::time::timeout(c.client.timeout, c.client.cmd(b"RSET\r\n")).await,
                    Ok(Ok(r)) if r.code == 250
                );
                if ok {
                    c.needs_rset = false;
                    reused = Some(c);
                } else {
                    log::info!("session={session} RSET failed, opening a fresh connection");
                }
            } else {
                reused = Some(c);
            }
        }
        if let Some(mut c) = reused {
            let event = self.transaction(&mut c, sender, msg).await;
            // A server may close an idle connection at any moment; a connection that broke
            // before the first reply of this transaction carried nothing, so retry once on a
            // fresh one instead of deferring the job.
            match &event {
                Event::Disconnected {
                    stage: Stage::Mail, ..
                } => {
                    log::info!(
                        "session={session} reused connection was closed by the server, reconnecting"
                    );
                }
                _ => return (event, Some(c)),
            }
        }
        let mut c = match self.open(session).await {
            Ok(c) => c,
            Err(e) => return (e, None),
        };
        let event = self.transaction(&mut c, sender, msg).await;
        (event, Some(c))
    }

    /// Opens, greets, secures and authenticates a connection.
    async fn open(&self, session: u32) -> Result<Conn, Event> {
        let allow_starttls = true;
        match self.open_with(session, allow_starttls).await {
            Err(Event::TlsFailed { detail }) if self.relay.tls == TlsMode::Opportunistic => {
                // F13: opportunistic TLS whose handshake broke: a fresh plain connection.
                log::info!(
                    "session={session} STARTTLS handshake failed ({detail}); retrying in plain text"
                );
                self.open_with(session, false).await
            }
            other => other,
        }
    }

    async fn open_with(&self, session: u32, allow_starttls: bool) -> Result<Conn, Event> {
        let t = &self.timeouts;
        let addr = (self.relay.host.as_str(), self.relay.port);
        let tcp = match tokio::time::timeout(ms(t.connect_ms), TcpStream::connect(addr)).await {
            Err(_) => {
                return Err(Event::Timeout {
                    stage: Stage::Connect,
                });
            }
            Ok(Err(e)) => {
                return Err(Event::ConnectFailed {
                    detail: e.to_string(),
                });
            }
            Ok(Ok(s)) => s,
        };
        let _ = tcp.set_nodelay(true);
        let mut secured = false;
        let stream: Box<dyn Io> = match (&self.relay.tls, &self.tls) {
            (TlsMode::Implicit, Some(tls)) => {
                let s = self.handshake(tls, tcp).await?;
                secured = true;
                Box::new(s)
            }
            _ => Box::new(tcp),
        };
        let mut client: Client = SmtpClient {
            stream,
            timeout: ms(t.greeting_ms),
        };
        self.greet(&mut client).await?;
        let mut ehlo = self.ehlo(&mut client).await?;

        let want_tls =
            matches!(self.relay.tls, TlsMode::Required | TlsMode::Opportunistic) && allow_starttls;
        if want_tls && !secured {
            if ehlo.has_capability(EXT_START_TLS) {
                client.timeout = ms(t.ehlo_ms);
                let reply = call(Stage::Ehlo, t.ehlo_ms, client.cmd(b"STARTTLS\r\n")).await?;
                if reply.code == 220 {
                    let Some(tls) = &self.tls else {
                        return Err(Event::TlsFailed {
                            detail: "no TLS configuration".into(),
                        });
                    };
                    // The boxed stream is plain TCP here; unwrap it through a fresh TLS
                    // session on top of the same box.
                    let s = self.handshake(tls, client.stream).await?;
                    client = SmtpClient {
                        stream: Box::new(s),
                        timeout: ms(t.ehlo_ms),
                    };
                    secured = true;
                    ehlo = self.ehlo(&mut client).await?;
                } else if self.relay.tls == TlsMode::Required {
                    return Err(Event::Reply {
                        stage: Stage::Ehlo,
                        reply: Reply::from_response(&reply),
                    });
                }
            } else if self.relay.tls == TlsMode::Required {
                return Err(Event::StartTlsNotOffered);
            }
        }
        if self.relay.tls == TlsMode::Required && !secured {
            return Err(Event::TlsFailed {
                detail: "TLS required but not established".into(),
            });
        }

        if let Some(auth) = &self.relay.auth {
            if !secured && self.relay.tls != TlsMode::Off {
                return Err(Event::AuthFailed {
                    reply: None,
                    detail: "refusing to send AUTH over a connection without TLS".into(),
                });
            }
            let mut caps = ehlo.clone();
            // Only the mechanisms this build supports; CRAM-MD5 needs a feature we leave off.
            // mail-send tries the highest bit first: PLAIN, then LOGIN.
            caps.auth_mechanisms &= AUTH_PLAIN | AUTH_LOGIN;
            let creds = Credentials::Plain {
                username: auth.username.clone(),
                secret: auth.password.clone(),
            };
            client.timeout = ms(t.ehlo_ms);
            match tokio::time::timeout(
                ms(t.ehlo_ms.saturating_mul(3)),
                client.authenticate(&creds, &caps),
            )
            .await
            {
                Err(_) => return Err(Event::Timeout { stage: Stage::Ehlo }),
                Ok(Err(e)) => {
                    return Err(match Event::from_mail_send(Stage::Ehlo, e) {
                        Event::Reply { reply, .. } => Event::AuthFailed {
                            reply: Some(reply),
                            detail: String::new(),
                        },
                        other => other,
                    });
                }
                Ok(Ok(_)) => {}
            }
        }
        log::info!(
            "session={session} connected host={} port={} tls={secured} 8bitmime={} smtputf8={} pipelining={}",
            self.relay.host,
            self.relay.port,
            ehlo.has_capability(EXT_8BIT_MIME),
            ehlo.has_capability(EXT_SMTP_UTF8),
            ehlo.has_capability(EXT_PIPELINING),
        );
        Ok(Conn {
            client,
            ehlo,
            needs_rset: false,
            last_used: Instant::now(),
        })
    }

    async fn handshake<S>(
        &self,
        tls: &TlsConnector,
        stream: S,
    ) -> Result<tokio_rustls::client::TlsStream<S>, Event>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let name =
            rustls::pki_types::ServerName::try_from(self.relay.host.clone()).map_err(|_| {
                Event::TlsFailed {
                    detail: format!("invalid TLS server name {:?}", self.relay.host),
                }
            })?;
        match tokio::time::timeout(ms(self.timeouts.connect_ms), tls.connect(name, stream)).await {
            Err(_) => Err(Event::TlsFailed {
                detail: "TLS handshake timed out".into(),
            }),
            Ok(Err(e)) => Err(Event::TlsFailed {
                detail: e.to_string(),
            }),
            Ok(Ok(s)) => Ok(s),
        }
    }

    async fn greet(&self, client: &mut Client) -> Result<(), Event> {
        let reply = call(Stage::Greeting, self.timeouts.greeting_ms, client.read()).await?;
        if reply.code != 220 {
            // F9: 421 or 554 instead of a greeting; say goodbye politely (best effort).
            client.timeout = ms(500);
            let _ = tokio::time::timeout(ms(500), client.cmd(b"QUIT\r\n")).await;
            return Err(Event::Reply {
                stage: Stage::Greeting,
                reply: Reply::from_response(&reply),
            });
        }
        Ok(())
    }

    async fn ehlo(&self, client: &mut Client) -> Result<EhloResponse<String>, Event> {
        let t = self.timeouts.ehlo_ms;
        client.timeout = ms(t);
        match tokio::time::timeout(ms(t), client.ehlo(&self.relay.helo)).await {
            Err(_) => Err(Event::Timeout { stage: Stage::Ehlo }),
            Ok(Ok(r)) => Ok(r),
            // An old server without ESMTP: HELO, no extensions.
            Ok(Err(mail_send::Error::UnexpectedReply(r))) if matches!(r.code, 500 | 502) => {
                let cmd = format!("HELO {}\r\n", self.relay.helo);
                let reply = call(Stage::Ehlo, t, client.cmd(cmd.as_bytes())).await?;
                if reply.code / 100 != 2 {
                    return Err(Event::Reply {
                        stage: Stage::Ehlo,
                        reply: Reply::from_response(&reply),
                    });
                }
                Ok(EhloResponse::default())
            }
            Ok(Err(e)) => Err(Event::from_mail_send(Stage::Ehlo, e)),
        }
    }

    /// MAIL, RCPT, DATA, message, final dot. Returns the event that ended the attempt
    /// (a 2xx reply at [`Stage::FinalDot`] when delivered).
    async fn transaction(&self, c: &mut Conn, sender: &str, msg: &Rendered) -> Event {
        match self.transaction_inner(c, sender, msg).await {
            Ok(e) | Err(e) => e,
        }
    }

    async fn transaction_inner(
        &self,
        c: &mut Conn,
        sender: &str,
        msg: &Rendered,
    ) -> Result<Event, Event> {
        let t = &self.timeouts;
        let eight_bit_mime = c.ehlo.has_capability(EXT_8BIT_MIME);
        let smtputf8 = c.ehlo.has_capability(EXT_SMTP_UTF8);
        if msg.needs_smtputf8 && !smtputf8 {
            return Err(Event::Smtputf8NotOffered {
                address: msg.envelope_to.clone(),
            });
        }
        // Everything that can refuse the message is decided before MAIL: nothing malformed
        // ever reaches the wire and no transaction is left to reset.
        let wire = self.prepare(msg, eight_bit_mime)?;
        let eight_bit = wire.iter().any(|&b| b >= 0x80);
        let mut mail = format!("MAIL FROM:<{sender}>");
        if eight_bit && eight_bit_mime {
            mail.push_str(" BODY=8BITMIME");
        }
        if msg.needs_smtputf8 {
            mail.push_str(" SMTPUTF8");
        }
        mail.push_str("\r\n");
        let rcpt = format!("RCPT TO:<{}>\r\n", msg.envelope_to);

        if c.ehlo.has_capability(EXT_PIPELINING) {
            // RFC 2920: MAIL and RCPT in one write, two replies read back.
            let deadline = t.mail_ms.max(t.rcpt_ms);
            c.client.timeout = ms(deadline);
            let replies = call(
                Stage::Mail,
                deadline,
                c.client.cmds([mail.as_bytes(), rcpt.as_bytes()]),
            )
            .await?;
            for (stage, r) in [Stage::Mail, Stage::Rcpt].into_iter().zip(&replies) {
                if r.code / 100 != 2 {
                    return Err(Event::Reply {
                        stage,
                        reply: Reply::from_response(r),
                    });
                }
            }
        } else {
            for (stage, cmd, deadline) in [
                (Stage::Mail, &mail, t.mail_ms),
                (Stage::Rcpt, &rcpt, t.rcpt_ms),
            ] {
                c.client.timeout = ms(deadline);
                let r = call(stage, deadline, c.client.cmd(cmd.as_bytes())).await?;
                if r.code / 100 != 2 {
                    return Err(Event::Reply {
                        stage,
                        reply: Reply::from_response(&r),
                    });
                }
            }
        }

        c.client.timeout = ms(t.data_ms);
        let r = call(Stage::Data, t.data_ms, c.client.cmd(b"DATA\r\n")).await?;
        if r.code != 354 {
            return Err(Event::Reply {
                stage: Stage::Data,
                reply: Reply::from_response(&r),
            });
        }
        let write = async {
            c.client.stream.write_all(&wire).await?;
            c.client.stream.flush().await
        };
        match tokio::time::timeout(ms(t.data_ms), write).await {
            Err(_) => return Err(Event::Timeout { stage: Stage::Data }),
            Ok(Err(e)) => {
                return Err(Event::Disconnected {
                    stage: Stage::Data,
                    detail: e.to_string(),
                });
            }
            Ok(Ok(())) => {}
        }
        // From here on the server may have accepted the message: a lost reply is in doubt.
        let r = call(Stage::FinalDot, t.final_dot_ms, c.client.read()).await?;
        Ok(Event::Reply {
            stage: Stage::FinalDot,
            reply: Reply::from_response(&r),
        })
    }
}

impl Pool {
    /// The exact DATA bytes for this server: 7-bit form if needed, CRLF, line limit checked,
    /// DKIM-signed, dot-stuffed and terminated.
    fn prepare(&self, msg: &Rendered, eight_bit_mime: bool) -> Result<Vec<u8>, Event> {
        // With SMTPUTF8 (checked by the caller) the message may carry UTF-8 as it is.
        let content = if msg.eight_bit && !eight_bit_mime && !msg.needs_smtputf8 {
            let converted =
                seven_bit(&msg.bytes).map_err(|detail| Event::EightBitNotOffered { detail })?;
            normalize_line_endings(&converted)
        } else {
            normalize_line_endings(&msg.bytes)
        };
        if let Some(len) = content
            .split(|&b| b == b'\n')
            .map(|l| l.len().saturating_sub(1))
            .find(|&l| l > MAX_LINE)
        {
            return Err(Event::Unsendable {
                detail: format!(
                    "the message has a line of {len} octets, more than the 998 SMTP allows"
                ),
            });
        }
        let signed = match &self.dkim {
            None => content,
            Some(signer) => {
                let mut out = signer.sign(&content).map_err(|e| Event::Unsendable {
                    detail: e.to_string(),
                })?;
                out.extend_from_slice(&content);
                out
            }
        };
        Ok(dot_stuff(&signed))
    }
}

/// RFC 5321 4.5.3.1.6: a text line is at most 998 octets plus CRLF.
const MAX_LINE: usize = 998;

/// Awaits a mail-send call under a deadline, mapping failures to events of `stage`.
async fn call<T>(
    stage: Stage,
    deadline_ms: u32,
    f: impl Future<Output = mail_send::Result<T>>,
) -> Result<T, Event> {
    match tokio::time::timeout(ms(deadline_ms), f).await {
        Err(_) => Err(Event::Timeout { stage }),
        Ok(Err(e)) => Err(Event::from_mail_send(stage, e)),
        Ok(Ok(v)) => Ok(v),
    }
}

/// Line endings as SMTP requires them (F2): CRLF, CR and LF each become one CRLF (so
/// normalising is idempotent and a `.` after a bare LF is a line of its own), and a message
/// that does not end in a line break gets one. These are the bytes the receiver stores.
pub fn normalize_line_endings(msg: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(msg.len() + msg.len() / 64 + 2);
    let mut i = 0;
    while i < msg.len() {
        match msg[i] {
            b'\r' | b'\n' => {
                out.extend_from_slice(b"\r\n");
                if msg[i] == b'\r' && msg.get(i + 1) == Some(&b'\n') {
                    i += 1;
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    if !out.is_empty() && !out.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// Frames a message for DATA: line endings normalised ([`normalize_line_endings`]), every
/// line starting with `.` gets one more `.` (RFC 5321 4.5.2, done exactly once), and the
/// terminating `.` CRLF follows. A message that already ends in CRLF gets no extra empty line.
pub fn dot_stuff(msg: &[u8]) -> Vec<u8> {
    let msg = normalize_line_endings(msg);
    let mut out = Vec::with_capacity(msg.len() + msg.len() / 64 + 3);
    for line in msg.split_inclusive(|&b| b == b'\n') {
        if line.first() == Some(&b'.') {
            out.push(b'.');
        }
        out.extend_from_slice(line);
    }
    out.extend_from_slice(b".\r\n");
    out
}

/// TLS client configuration: the platform's roots, only the CAs of `ca_file` when one is
/// given (a smarthost with a private CA), or no verification when explicitly asked (tests).
fn tls_connector(relay: &Relay) -> anyhow::Result<TlsConnector> {
    use anyhow::Context as _;
    if relay.insecure_skip_verify {
        return mail_send::smtp::tls::build_tls_connector(true).map_err(anyhow::Error::msg);
    }
    let Some(ca_file) = &relay.ca_file else {
        return mail_send::smtp::tls::build_tls_connector(false).map_err(anyhow::Error::msg);
    };
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca_file)
        .with_context(|| format!("while reading CA file {ca_file}"))?
    {
        let cert = cert.with_context(|| format!("while parsing CA file {ca_file}"))?;
        roots
            .add(cert)
            .with_context(|| format!("while adding a certificate of {ca_file}"))?;
    }
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(TlsConnector::from(Arc::new(config)))
}

#[cfg(test)]
mod tests;
