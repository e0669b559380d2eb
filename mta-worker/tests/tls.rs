//! TLS towards a real TLS-capable receiver (aiosmtpd) with a certificate made by the test:
//! STARTTLS opportunistic and required, implicit TLS, certificate verification, and AUTH only
//! ever over TLS (FAULTS.md F13 against a real peer; the broken handshake itself is played by
//! the scripted server in `session/tests.rs`).

mod peers;

use mta_worker::session::Pool;
use peers::*;
use protocol::{Auth, OutcomeKind, Relay, Stage, TlsMode};

fn template() -> mta_worker::Renderer {
    campaign(
        "From: news@example.com\nTo: {{ email }}\nSubject: tls\n\nhi\n",
        &["email"],
    )
}

fn tls_relay(peer: &Peer, tls: TlsMode, certs: Option<&Certs>, auth: bool) -> Relay {
    Relay {
        ca_file: certs.map(|c| c.ca.display().to_string()),
        auth: auth.then(|| Auth {
            username: "mailer".into(),
            password: "s3cret".into(),
        }),
        ..relay("localhost", peer.port, tls)
    }
}

async fn send_one(relay: Relay) -> mta_worker::outcome::Classified {
    let p = Pool::new(relay, timeouts(), 1).unwrap();
    send(&p, &template(), "a@example.com", &["a@example.com"]).await
}

fn args<'a>(certs: &'a [String], more: &[&'a str]) -> Vec<&'a str> {
    certs
        .iter()
        .map(String::as_str)
        .chain(more.iter().copied())
        .collect()
}

#[tokio::test]
async fn opportunistic_starttls_delivers_over_tls_when_offered() {
    let certs = Certs::generate();
    let a = certs.args();
    let Some(peer) = Peer::start("tls-opp", &args(&a, &["--starttls"])) else {
        return;
    };
    let o = send_one(tls_relay(
        &peer,
        TlsMode::Opportunistic,
        Some(&certs),
        false,
    ))
    .await;
    assert_eq!(o.kind, OutcomeKind::Delivered, "{o:?}");
    assert_eq!(peer.message(1).1["tls"], true);
}

#[tokio::test]
async fn opportunistic_without_starttls_delivers_in_plain_text_but_never_sends_auth() {
    let Some(peer) = Peer::start("tls-opp-plain", &[]) else {
        return;
    };
    let o = send_one(tls_relay(&peer, TlsMode::Opportunistic, None, false)).await;
    assert_eq!(o.kind, OutcomeKind::Delivered, "{o:?}");
    assert_eq!(peer.message(1).1["tls"], false);

    // With credentials the worker would have to AUTH in clear text: it defers instead.
    let o = send_one(tls_relay(&peer, TlsMode::Opportunistic, None, true)).await;
    assert_eq!(
        (o.kind, o.stage),
        (OutcomeKind::Deferred, Stage::Ehlo),
        "{o:?}"
    );
    assert_eq!(
        o.text,
        "AUTH failed: refusing to send AUTH over a connection without TLS"
    );
    assert!(peer.auth_events().is_empty(), "AUTH reached the server");
    assert_eq!(peer.count(), 1);
}

#[tokio::test]
async fn required_tls_fails_clearly_against_a_server_without_starttls() {
    let Some(peer) = Peer::start("tls-req-none", &["--auth", "mailer:s3cret"]) else {
        return;
    };
    let o = send_one(tls_relay(&peer, TlsMode::Required, None, true)).await;
    assert_eq!(
        (o.kind, o.stage, o.code, o.text.as_str()),
        (
            OutcomeKind::Deferred,
            Stage::Ehlo,
            0,
            "TLS is required but the server does not offer STARTTLS; not sending in clear text"
        )
    );
    assert!(peer.auth_events().is_empty(), "AUTH reached the server");
    assert_eq!(peer.count(), 0);
}

#[tokio::test]
async fn certificates_are_verified_unless_the_ca_file_trusts_them() {
    let certs = Certs::generate();
    let a = certs.args();
    let Some(peer) = Peer::start("tls-verify", &args(&a, &["--starttls"])) else {
        return;
    };
    // Not signed by a CA of the system store: refused, and required mode never downgrades.
    let o = send_one(tls_relay(&peer, TlsMode::Required, None, false)).await;
    assert_eq!(
        (o.kind, o.stage),
        (OutcomeKind::Deferred, Stage::Connect),
        "{o:?}"
    );
    assert!(
        o.text.starts_with("TLS handshake failed:") && o.text.contains("certificate"),
        "{}",
        o.text
    );
    assert_eq!(peer.count(), 0);
    // The same server with its CA in ca_file.
    let o = send_one(tls_relay(&peer, TlsMode::Required, Some(&certs), false)).await;
    assert_eq!(o.kind, OutcomeKind::Delivered, "{o:?}");
    assert_eq!(peer.message(1).1["tls"], true);
    // A certificate for another name is refused even with the right CA.
    let mut wrong_name = tls_relay(&peer, TlsMode::Required, Some(&certs), false);
    wrong_name.host = "127.0.0.2".into();
    let o = send_one(wrong_name).await;
    assert_eq!(
        (o.kind, o.stage),
        (OutcomeKind::Deferred, Stage::Connect),
        "{o:?}"
    );
    assert_eq!(peer.count(), 1);
}

#[tokio::test]
async fn auth_plain_works_over_starttls_and_never_in_clear_text() {
    let certs = Certs::generate();
    let a = certs.args();
    let Some(peer) = Peer::start(
        "tls-auth",
        &args(
            &a,
            &[
                "--starttls",
                "--require-starttls",
                "--auth",
                "mailer:s3cret",
            ],
        ),
    ) else {
        return;
    };
    let o = send_one(tls_relay(&peer, TlsMode::Required, Some(&certs), true)).await;
    assert_eq!(o.kind, OutcomeKind::Delivered, "{o:?}");
    let (_, meta) = peer.message(1);
    assert_eq!(
        (meta["tls"].clone(), meta["auth"].clone()),
        (true.into(), "mailer".into())
    );
    assert_eq!(
        peer.auth_log(),
        [("PLAIN".to_string(), true)],
        "one AUTH PLAIN, encrypted"
    );

    // Wrong password: refused by the server, deferred (a relay configuration problem).
    let mut bad = tls_relay(&peer, TlsMode::Required, Some(&certs), true);
    bad.auth = Some(Auth {
        username: "mailer".into(),
        password: "wrong".into(),
    });
    let o = send_one(bad).await;
    assert_eq!(
        (o.kind, o.code, o.enhanced.as_deref(), o.text.as_str()),
        (
            OutcomeKind::Deferred,
            535,
            Some("5.7.8"),
            "AUTH failed: 5.7.8 Authentication credentials invalid"
        )
    );
    assert_eq!(peer.auth_events(), [true, true]);
}

#[tokio::test]
async fn implicit_tls_with_auth() {
    let certs = Certs::generate();
    let a = certs.args();
    let Some(peer) = Peer::start(
        "tls-implicit",
        &args(&a, &["--implicit-tls", "--auth", "mailer:s3cret"]),
    ) else {
        return;
    };
    let o = send_one(tls_relay(&peer, TlsMode::Implicit, Some(&certs), true)).await;
    assert_eq!(o.kind, OutcomeKind::Delivered, "{o:?}");
    let (_, meta) = peer.message(1);
    assert_eq!(
        (meta["tls"].clone(), meta["auth"].clone()),
        (true.into(), "mailer".into())
    );
    assert_eq!(peer.auth_events(), [true]);
    // Without the CA: no downgrade, nothing sent.
    let o = send_one(tls_relay(&peer, TlsMode::Implicit, None, true)).await;
    assert_eq!(
        (o.kind, o.stage),
        (OutcomeKind::Deferred, Stage::Connect),
        "{o:?}"
    );
    assert_eq!(peer.count(), 1);
    assert_eq!(peer.auth_events(), [true]);
}
