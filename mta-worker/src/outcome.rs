//! Outcomes: the one place that decides what an attempt ended as.
//!
//! The session describes *what happened* as an [`Event`] (a reply at a stage, a timeout, a lost
//! connection, a local refusal); [`classify`] turns it into the [`protocol::JobOutcome`] fields
//! and says whether the connection may carry another job. Keeping this a pure, exhaustive
//! function means every SMTP client error has exactly one documented meaning and the table test
//! below is the specification (STYLE.md 6 and 7).

use protocol::{OutcomeKind, Stage};

/// An SMTP reply as the outcome needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// Three-digit reply code.
    pub code: u16,
    /// Enhanced status code (`x.y.z`), when the server sent one.
    pub enhanced: Option<String>,
    /// The reply text without code and enhanced code; lines of a multi-line reply joined with
    /// a single space.
    pub text: String,
}

impl Reply {
    /// Builds a reply from its code and raw text (lines separated by `\n` or `\r\n`, codes
    /// already removed); an enhanced code at the start of the text is split off.
    pub fn parse(code: u16, raw: &str) -> Reply {
        let joined = raw
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join(" ");
        let first = joined.split(' ').next().unwrap_or("");
        if is_enhanced(first, code) {
            let text = joined[first.len()..].trim_start().to_string();
            Reply {
                code,
                enhanced: Some(first.to_string()),
                text,
            }
        } else {
            Reply {
                code,
                enhanced: None,
                text: joined,
            }
        }
    }

    /// Converts a reply parsed by mail-send (smtp-proto), which has already split off the
    /// enhanced code of each line and joined lines with `\n`.
    pub fn from_response(r: &smtp_proto::Response<String>) -> Reply {
        let mut reply = Reply::parse(r.code, &r.message);
        if r.esc != [0, 0, 0] {
            reply.enhanced = Some(format!("{}.{}.{}", r.esc[0], r.esc[1], r.esc[2]));
        }
        reply
    }

    /// `enhanced text` (or just the text): what goes into [`protocol::JobOutcome::text`].
    pub fn full_text(&self) -> String {
        match &self.enhanced {
            Some(e) if self.text.is_empty() => e.clone(),
            Some(e) => format!("{e} {}", self.text),
            None => self.text.clone(),
        }
    }
}

/// `x.y.z` per RFC 3463, its class matching the reply code's first digit.
fn is_enhanced(s: &str, code: u16) -> bool {
    let parts: Vec<&str> = s.split('.').collect();
    parts.len() == 3
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()))
        && matches!(parts[0], "2" | "4" | "5")
        && u16::from(parts[0].as_bytes()[0] - b'0') == code / 100
}

/// What ended an attempt, as seen by the session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The server replied; for [`Stage::FinalDot`] any reply ends the attempt, elsewhere only
    /// a reply other than the expected one does.
    Reply {
        /// Stage whose command was answered.
        stage: Stage,
        /// The reply.
        reply: Reply,
    },
    /// No (complete) reply before the stage's deadline.
    Timeout {
        /// Stage that timed out.
        stage: Stage,
    },
    /// The connection broke (reset, EOF, unparseable reply) at a stage.
    Disconnected {
        /// Stage during which it broke.
        stage: Stage,
        /// The I/O error.
        detail: String,
    },
    /// TCP connect failed (refused, unreachable, no address).
    ConnectFailed {
        /// Why.
        detail: String,
    },
    /// The TLS handshake failed (implicit TLS or STARTTLS in required mode).
    TlsFailed {
        /// Why.
        detail: String,
    },
    /// TLS is required but the server does not offer STARTTLS.
    StartTlsNotOffered,
    /// AUTH was refused or impossible (no common mechanism).
    AuthFailed {
        /// The server's reply, if it gave one.
        reply: Option<Reply>,
        /// Why, when there was no reply.
        detail: String,
    },
    /// The message could not be personalised.
    Render {
        /// The render error.
        detail: String,
    },
    /// The envelope needs SMTPUTF8 and the server does not offer it.
    Smtputf8NotOffered {
        /// The address that needs it.
        address: String,
    },
    /// The message has 8-bit data, the server does not offer 8BITMIME, and the message cannot
    /// be made 7-bit clean.
    EightBitNotOffered {
        /// Why it cannot be converted.
        detail: String,
    },
    /// The message cannot be sent as it is (a line over 998 octets, DKIM signing failed);
    /// decided before MAIL, so nothing went on the wire.
    Unsendable {
        /// Why.
        detail: String,
    },
    /// A local failure unrelated to the message (e.g. the worker has no template for the job).
    Local {
        /// Stage to report.
        stage: Stage,
        /// Why.
        detail: String,
        /// Whether retrying can help.
        permanent: bool,
    },
}

impl Event {
    /// Maps every `mail_send::Error` raised at `stage` to an event.
    pub fn from_mail_send(stage: Stage, err: mail_send::Error) -> Event {
        use mail_send::Error as E;
        match err {
            E::Io(e) if stage == Stage::Connect => Event::ConnectFailed {
                detail: e.to_string(),
            },
            E::Io(e) => Event::Disconnected {
                stage,
                detail: e.to_string(),
            },
            E::Tls(e) => Event::TlsFailed {
                detail: e.to_string(),
            },
            E::InvalidTLSName => Event::TlsFailed {
                detail: "invalid TLS server name".into(),
            },
            // mail-send reports EOF as an unparseable reply: the peer went away.
            E::UnparseableReply => Event::Disconnected {
                stage,
                detail: "connection closed or unparseable reply".into(),
            },
            E::UnexpectedReply(r) => Event::Reply {
                stage,
                reply: Reply::from_response(&r),
            },
            E::AuthenticationFailed(r) => Event::AuthFailed {
                reply: Some(Reply::from_response(&r)),
                detail: String::new(),
            },
            E::Timeout => Event::Timeout { stage },
            E::MissingStartTls => Event::StartTlsNotOffered,
            E::UnsupportedAuthMechanism => Event::AuthFailed {
                reply: None,
                detail: "the server offers no AUTH mechanism we support (PLAIN, LOGIN)".into(),
            },
            E::MissingCredentials => Event::AuthFailed {
                reply: None,
                detail: "missing credentials".into(),
            },
            E::Auth(e) => Event::AuthFailed {
                reply: None,
                detail: format!("{e:?}"),
            },
            E::Base64(e) => Event::AuthFailed {
                reply: None,
                detail: e.to_string(),
            },
            E::MissingMailFrom | E::MissingRcptTo => Event::Local {
                stage,
                detail: err_text(stage, "mail-send refused the envelope"),
                permanent: true,
            },
        }
    }
}

fn err_text(stage: Stage, s: &str) -> String {
    format!("{s} at {stage:?}")
}

/// The outcome fields of an attempt, plus what to do with the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Classified {
    /// Delivered / Deferred / Bounced / InDoubt.
    pub kind: OutcomeKind,
    /// SMTP code, 0 when no server reply ended the attempt.
    pub code: u16,
    /// Enhanced status code, if any.
    pub enhanced: Option<String>,
    /// Full reply text or the local reason.
    pub text: String,
    /// Stage at which the attempt ended.
    pub stage: Stage,
    /// Whether the connection may carry another job (after RSET unless delivered). False after
    /// a 421, a timeout, a broken connection or anything that leaves the SMTP state unknown.
    pub reusable: bool,
}

/// The one mapping from what happened to an outcome.
pub fn classify(event: &Event) -> Classified {
    let local = |kind, stage, text: String, reusable| Classified {
        kind,
        code: 0,
        enhanced: None,
        text,
        stage,
        reusable,
    };
    match event {
        Event::Reply { stage, reply } => {
            let (kind, reusable) = match (reply.code / 100, reply.code) {
                // 421: the service is closing the channel, at any stage (F10, F14).
                (_, 421) => (OutcomeKind::Deferred, false),
                // Delivered means a 2xx after the final dot, nothing earlier.
                (2, _) if *stage == Stage::FinalDot => (OutcomeKind::Delivered, true),
                (4, _) => (OutcomeKind::Deferred, is_transaction(*stage)),
                (5, _) => (OutcomeKind::Bounced, is_transaction(*stage)),
                // A reply the protocol does not allow here (e.g. 250 to DATA): the server's
                // state is unknown, so retry later on a fresh connection.
                _ => (OutcomeKind::Deferred, false),
            };
            Classified {
                kind,
                code: reply.code,
                enhanced: reply.enhanced.clone(),
                text: reply.full_text(),
                stage: *stage,
                reusable,
            }
        }
        // After the final dot the message may have been accepted: in doubt, retried and flagged.
        Event::Timeout { stage: Stage::FinalDot } => local(
            OutcomeKind::InDoubt,
            Stage::FinalDot,
            "timed out waiting for the reply after the final dot; the message may have been delivered".into(),
            false,
        ),
        Event::Disconnected { stage: Stage::FinalDot, detail } => local(
            OutcomeKind::InDoubt,
            Stage::FinalDot,
            format!("connection lost after the final dot ({detail}); the message may have been delivered"),
            false,
        ),
        Event::Timeout { stage } => {
            local(OutcomeKind::Deferred, *stage, format!("timed out at {}", stage_name(*stage)), false)
        }
        Event::Disconnected { stage, detail } => local(
            OutcomeKind::Deferred,
            *stage,
            format!("connection lost at {}: {detail}", stage_name(*stage)),
            false,
        ),
        Event::ConnectFailed { detail } => {
            local(OutcomeKind::Deferred, Stage::Connect, format!("connect failed: {detail}"), false)
        }
        Event::TlsFailed { detail } => {
            local(OutcomeKind::Deferred, Stage::Connect, format!("TLS handshake failed: {detail}"), false)
        }
        Event::StartTlsNotOffered => local(
            OutcomeKind::Deferred,
            Stage::Ehlo,
            "TLS is required but the server does not offer STARTTLS; not sending in clear text".into(),
            false,
        ),
        Event::AuthFailed { reply: Some(r), .. } => Classified {
            // A refused login is a configuration problem of the relay, not of this recipient:
            // keep the job until the operator fixes the credentials.
            kind: OutcomeKind::Deferred,
            code: r.code,
            enhanced: r.enhanced.clone(),
            text: format!("AUTH failed: {}", r.full_text()),
            stage: Stage::Ehlo,
            reusable: false,
        },
        Event::AuthFailed { reply: None, detail } => {
            local(OutcomeKind::Deferred, Stage::Ehlo, format!("AUTH failed: {detail}"), false)
        }
        Event::Render { detail } => local(OutcomeKind::Bounced, Stage::Render, detail.clone(), true),
        Event::Smtputf8NotOffered { address } => local(
            OutcomeKind::Bounced,
            Stage::Mail,
            format!(
                "recipient {address} needs SMTPUTF8 (non-ASCII local part) and the server does not offer it"
            ),
            true,
        ),
        Event::EightBitNotOffered { detail } => local(
            OutcomeKind::Bounced,
            Stage::Mail,
            format!(
                "message contains 8-bit data and the server does not offer 8BITMIME; it cannot \
                 be converted to 7 bits: {detail}"
            ),
            true,
        ),
        Event::Unsendable { detail } => local(
            OutcomeKind::Bounced,
            Stage::Mail,
            format!("message not sent: {detail}"),
            true,
        ),
        Event::Local { stage, detail, permanent } => local(
            if *permanent { OutcomeKind::Bounced } else { OutcomeKind::Deferred },
            *stage,
            detail.clone(),
            true,
        ),
    }
}

/// Stages inside a mail transaction, where a negative reply leaves the connection usable
/// after RSET.
fn is_transaction(stage: Stage) -> bool {
    matches!(
        stage,
        Stage::Mail | Stage::Rcpt | Stage::Data | Stage::FinalDot
    )
}

fn stage_name(stage: Stage) -> &'static str {
    match stage {
        Stage::Render => "render",
        Stage::Connect => "connect",
        Stage::Greeting => "greeting",
        Stage::Ehlo => "EHLO",
        Stage::Mail => "MAIL FROM",
        Stage::Rcpt => "RCPT TO",
        Stage::Data => "DATA",
        Stage::FinalDot => "final dot",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use OutcomeKind::*;

    fn reply(stage: Stage, code: u16, text: &str) -> Event {
        Event::Reply {
            stage,
            reply: Reply::parse(code, text),
        }
    }

    /// Event, then the expected kind, code, enhanced code, stage and reusability.
    type Case = (Event, OutcomeKind, u16, Option<&'static str>, Stage, bool);

    #[test]
    fn classify_table() {
        let cases: Vec<Case> = vec![
            (
                reply(Stage::FinalDot, 250, "2.0.0 Ok: queued as X"),
                Delivered,
                250,
                Some("2.0.0"),
                Stage::FinalDot,
                true,
            ),
            (
                reply(Stage::FinalDot, 451, "4.3.0 try later"),
                Deferred,
                451,
                Some("4.3.0"),
                Stage::FinalDot,
                true,
            ),
            (
                reply(Stage::FinalDot, 554, "5.7.1 spam"),
                Bounced,
                554,
                Some("5.7.1"),
                Stage::FinalDot,
                true,
            ),
            (
                reply(Stage::Rcpt, 450, "4.7.0 rate limit"),
                Deferred,
                450,
                Some("4.7.0"),
                Stage::Rcpt,
                true,
            ),
            (
                reply(Stage::Rcpt, 550, "5.1.1 no such user"),
                Bounced,
                550,
                Some("5.1.1"),
                Stage::Rcpt,
                true,
            ),
            (
                reply(Stage::Mail, 450, "4.7.1 too much mail"),
                Deferred,
                450,
                Some("4.7.1"),
                Stage::Mail,
                true,
            ),
            (
                reply(Stage::Data, 421, "4.4.2 closing"),
                Deferred,
                421,
                Some("4.4.2"),
                Stage::Data,
                false,
            ),
            (
                reply(Stage::Greeting, 421, "4.3.2 Too many connections"),
                Deferred,
                421,
                Some("4.3.2"),
                Stage::Greeting,
                false,
            ),
            (
                reply(Stage::Greeting, 554, "5.7.1 not allowed"),
                Bounced,
                554,
                Some("5.7.1"),
                Stage::Greeting,
                false,
            ),
            (
                reply(Stage::Rcpt, 421, "closing"),
                Deferred,
                421,
                None,
                Stage::Rcpt,
                false,
            ),
            (
                reply(Stage::Data, 250, "unexpected"),
                Deferred,
                250,
                None,
                Stage::Data,
                false,
            ),
            (
                reply(Stage::FinalDot, 354, "go on"),
                Deferred,
                354,
                None,
                Stage::FinalDot,
                false,
            ),
            (
                Event::Timeout {
                    stage: Stage::FinalDot,
                },
                InDoubt,
                0,
                None,
                Stage::FinalDot,
                false,
            ),
            (
                Event::Disconnected {
                    stage: Stage::FinalDot,
                    detail: "reset".into(),
                },
                InDoubt,
                0,
                None,
                Stage::FinalDot,
                false,
            ),
            (
                Event::Disconnected {
                    stage: Stage::Data,
                    detail: "reset".into(),
                },
                Deferred,
                0,
                None,
                Stage::Data,
                false,
            ),
            (
                Event::Timeout {
                    stage: Stage::Greeting,
                },
                Deferred,
                0,
                None,
                Stage::Greeting,
                false,
            ),
            (
                Event::Timeout { stage: Stage::Rcpt },
                Deferred,
                0,
                None,
                Stage::Rcpt,
                false,
            ),
            (
                Event::ConnectFailed {
                    detail: "refused".into(),
                },
                Deferred,
                0,
                None,
                Stage::Connect,
                false,
            ),
            (
                Event::TlsFailed {
                    detail: "bad cert".into(),
                },
                Deferred,
                0,
                None,
                Stage::Connect,
                false,
            ),
            (
                Event::StartTlsNotOffered,
                Deferred,
                0,
                None,
                Stage::Ehlo,
                false,
            ),
            (
                Event::AuthFailed {
                    reply: Some(Reply::parse(535, "5.7.8 bad credentials")),
                    detail: String::new(),
                },
                Deferred,
                535,
                Some("5.7.8"),
                Stage::Ehlo,
                false,
            ),
            (
                Event::Render {
                    detail: "bad address".into(),
                },
                Bounced,
                0,
                None,
                Stage::Render,
                true,
            ),
            (
                Event::Smtputf8NotOffered {
                    address: "ñandú@example.com".into(),
                },
                Bounced,
                0,
                None,
                Stage::Mail,
                true,
            ),
            (
                Event::Unsendable {
                    detail: "line too long".into(),
                },
                Bounced,
                0,
                None,
                Stage::Mail,
                true,
            ),
            (
                Event::EightBitNotOffered {
                    detail: "multipart".into(),
                },
                Bounced,
                0,
                None,
                Stage::Mail,
                true,
            ),
            (
                Event::Local {
                    stage: Stage::Render,
                    detail: "unknown campaign".into(),
                    permanent: true,
                },
                Bounced,
                0,
                None,
                Stage::Render,
                true,
            ),
        ];
        for (event, kind, code, enhanced, stage, reusable) in cases {
            let c = classify(&event);
            assert_eq!(
                (c.kind, c.code, c.enhanced.as_deref(), c.stage, c.reusable),
                (kind, code, enhanced, stage, reusable),
                "{event:?}"
            );
            assert!(!c.text.is_empty(), "{event:?}");
        }
    }

    #[test]
    fn reasons_are_clear() {
        let t = classify(&Event::Smtputf8NotOffered {
            address: "ñandú@example.com".into(),
        })
        .text;
        assert!(
            t.contains("SMTPUTF8") && t.contains("ñandú@example.com"),
            "{t}"
        );
        assert!(
            classify(&Event::EightBitNotOffered {
                detail: "the multipart body contains 8-bit data".into()
            })
            .text
            .contains("8BITMIME")
        );
    }

    #[test]
    fn multi_line_reply_is_joined_with_a_space() {
        let r = Reply::parse(550, "5.1.1 first line\n5.1.1 second line\r\nthird");
        assert_eq!(r.enhanced.as_deref(), Some("5.1.1"));
        assert_eq!(r.text, "first line 5.1.1 second line third");
        assert_eq!(r.full_text(), "5.1.1 first line 5.1.1 second line third");
    }

    #[test]
    fn enhanced_code_must_match_the_reply_class() {
        assert_eq!(Reply::parse(250, "4.0.0 odd").enhanced, None);
        assert_eq!(
            Reply::parse(250, "2.1.0 Sender ok").enhanced.as_deref(),
            Some("2.1.0")
        );
        assert_eq!(Reply::parse(250, "1.2.3.4 is an IP").enhanced, None);
        assert_eq!(Reply::parse(220, "").text, "");
    }

    #[test]
    fn mail_send_errors_map_to_events() {
        let e = Event::from_mail_send(Stage::FinalDot, mail_send::Error::Timeout);
        assert_eq!(classify(&e).kind, InDoubt);
        let e = Event::from_mail_send(Stage::FinalDot, mail_send::Error::UnparseableReply);
        assert_eq!(classify(&e).kind, InDoubt);
        let e = Event::from_mail_send(
            Stage::Connect,
            mail_send::Error::Io(std::io::ErrorKind::ConnectionRefused.into()),
        );
        assert_eq!(
            (classify(&e).kind, classify(&e).stage),
            (Deferred, Stage::Connect)
        );
        let r = smtp_proto::Response {
            code: 450,
            esc: [4, 7, 0],
            message: "rate limit".to_string(),
        };
        let e = Event::from_mail_send(Stage::Rcpt, mail_send::Error::UnexpectedReply(r));
        let c = classify(&e);
        assert_eq!(
            (c.kind, c.code, c.enhanced.as_deref(), c.text.as_str()),
            (Deferred, 450, Some("4.7.0"), "4.7.0 rate limit")
        );
    }
}
