//! DKIM signing (RFC 6376; Ed25519 per RFC 8463) of the exact bytes a session sends.
//!
//! # Theory of operation
//! The session decides the final form of a message only once it knows the server (a body may
//! be re-encoded to quoted-printable for a server without 8BITMIME), so signing happens there,
//! after that choice and after line endings are normalised to CRLF: the bytes signed are the
//! bytes sent, and dot-stuffing (which the receiver undoes) is the only change after signing.
//! Canonicalization is relaxed/relaxed, the common choice that survives the header re-folding
//! relays do. The private key comes from the governor in the Welcome frame; it never appears
//! in a log line or an error message.

use mail_auth::common::crypto::{Ed25519Key, RsaKey, Sha256};
use mail_auth::common::headers::HeaderWriter as _;
use mail_auth::dkim::{Canonicalization, DkimSigner, Done};
use protocol::{Dkim, DkimAlgorithm};
use rustls::pki_types::{PrivateKeyDer, pem::PemObject as _};

/// Header fields signed (RFC 6376 5.4.1's recommendations plus the MIME and list fields a bulk
/// message carries). mail-auth lists absent ones in `h=` too, which signs their absence: a
/// relay or attacker cannot add, say, a Reply-To without breaking the signature.
const SIGNED_HEADERS: [&str; 19] = [
    "From",
    "Sender",
    "Reply-To",
    "Subject",
    "Date",
    "Message-ID",
    "To",
    "Cc",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
    "Content-ID",
    "Content-Description",
    "In-Reply-To",
    "References",
    "List-Id",
    "List-Unsubscribe",
    "List-Unsubscribe-Post",
    "Feedback-ID",
];

/// Why DKIM could not be set up or applied. The texts never contain key material.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DkimError {
    /// The configured private key cannot be used.
    #[error("DKIM private key for selector {selector:?} of {domain}: {reason}")]
    Key {
        /// Signing domain.
        domain: String,
        /// Selector.
        selector: String,
        /// What is wrong and what to do.
        reason: String,
    },
    /// Signing one message failed (e.g. it has no header field to sign).
    #[error("DKIM signing failed: {0}")]
    Sign(String),
}

enum Inner {
    Rsa(Box<DkimSigner<RsaKey<Sha256>, Done>>),
    Ed25519(Box<DkimSigner<Ed25519Key, Done>>),
}

/// A DKIM signer for one domain and selector, built once per worker.
pub struct Signer {
    inner: Inner,
    domain: String,
    selector: String,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("domain", &self.domain)
            .field("selector", &self.selector)
            .finish_non_exhaustive()
    }
}

impl Signer {
    /// Parses the key and checks that it matches the algorithm. The governor calls this at
    /// start-up so a bad key stops it with a message naming the key, not every job.
    pub fn new(cfg: &Dkim) -> Result<Signer, DkimError> {
        let bad = |reason: String| DkimError::Key {
            domain: cfg.domain.clone(),
            selector: cfg.selector.clone(),
            reason,
        };
        if cfg.domain.is_empty() || cfg.selector.is_empty() {
            return Err(bad("domain and selector must not be empty".into()));
        }
        let key = PrivateKeyDer::from_pem_slice(cfg.private_key_pem.as_bytes()).map_err(|e| {
            bad(format!(
                "not a PEM private key ({}); expected `-----BEGIN PRIVATE KEY-----` (PKCS#8) or \
                 `-----BEGIN RSA PRIVATE KEY-----` (PKCS#1)",
                pem_error_kind(&e)
            ))
        })?;
        let inner = match cfg.algorithm {
            DkimAlgorithm::RsaSha256 => {
                let k = RsaKey::<Sha256>::from_key_der(key).map_err(|_| {
                    bad(
                        "not an RSA private key (algorithm is rsa-sha256); generate one with \
                         `openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048`"
                            .into(),
                    )
                })?;
                Inner::Rsa(Box::new(
                    DkimSigner::from_key(k)
                        .domain(&cfg.domain)
                        .selector(&cfg.selector)
                        .headers(SIGNED_HEADERS)
                        .header_canonicalization(Canonicalization::Relaxed)
                        .body_canonicalization(Canonicalization::Relaxed),
                ))
            }
            DkimAlgorithm::Ed25519Sha256 => {
                let PrivateKeyDer::Pkcs8(der) = key else {
                    return Err(bad(
                        "an ed25519 key must be PKCS#8 (`-----BEGIN PRIVATE KEY-----`)".into(),
                    ));
                };
                let k = Ed25519Key::from_pkcs8_der(der.secret_pkcs8_der()).map_err(|_| {
                    bad(
                        "not an Ed25519 private key (algorithm is ed25519); generate one with \
                         `openssl genpkey -algorithm ed25519`"
                            .into(),
                    )
                })?;
                Inner::Ed25519(Box::new(
                    DkimSigner::from_key(k)
                        .domain(&cfg.domain)
                        .selector(&cfg.selector)
                        .headers(SIGNED_HEADERS)
                        .header_canonicalization(Canonicalization::Relaxed)
                        .body_canonicalization(Canonicalization::Relaxed),
                ))
            }
        };
        Ok(Signer {
            inner,
            domain: cfg.domain.clone(),
            selector: cfg.selector.clone(),
        })
    }

    /// The `DKIM-Signature` header field (folded, ending in CRLF) to put in front of `msg`.
    /// `msg` must be exactly the bytes that will be sent (CRLF line endings, not dot-stuffed).
    pub fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, DkimError> {
        let sig = match &self.inner {
            Inner::Rsa(s) => s.sign(msg),
            Inner::Ed25519(s) => s.sign(msg),
        }
        .map_err(|e| DkimError::Sign(e.to_string()))?;
        Ok(sig.to_header().into_bytes())
    }

    /// Signing domain, for logs.
    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// Selector, for logs.
    pub fn selector(&self) -> &str {
        &self.selector
    }
}

/// The kind of a PEM error without its text (which could quote key material).
fn pem_error_kind(e: &rustls::pki_types::pem::Error) -> &'static str {
    use rustls::pki_types::pem::Error as E;
    match e {
        E::NoItemsFound => "no private key block found",
        E::MissingSectionEnd { .. } => "a PEM section has no END line",
        E::IllegalSectionStart { .. } => "malformed BEGIN line",
        E::Base64Decode(_) => "the key's base64 does not decode",
        _ => "unreadable",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(algorithm: DkimAlgorithm, pem: &str) -> Dkim {
        Dkim {
            domain: "example.com".into(),
            selector: "s1".into(),
            algorithm,
            private_key_pem: pem.into(),
        }
    }

    // An Ed25519 key (RFC 8410 example), PKCS#8.
    const ED25519_PEM: &str = "-----BEGIN PRIVATE KEY-----\n\
        MC4CAQAwBQYDK2VwBCIEINTuctv5E1hK1bbY8fdp+K06/nwoy/HU++CXqI9EdVhC\n\
        -----END PRIVATE KEY-----\n";

    #[test]
    fn signs_with_ed25519_and_the_header_is_well_formed() {
        let s = Signer::new(&cfg(DkimAlgorithm::Ed25519Sha256, ED25519_PEM)).unwrap();
        let h = String::from_utf8(
            s.sign(b"From: a@example.com\r\nSubject: x\r\n\r\nhi\r\n")
                .unwrap(),
        )
        .unwrap();
        assert!(
            h.starts_with(
                "DKIM-Signature: v=1; a=ed25519-sha256; s=s1; d=example.com; c=relaxed/relaxed;"
            ),
            "{h}"
        );
        assert!(h.ends_with("\r\n"), "{h}");
        let unfolded = h.replace("\r\n\t", "");
        let list = unfolded
            .split("h=")
            .nth(1)
            .unwrap()
            .split(';')
            .next()
            .unwrap();
        let names: Vec<&str> = list.split(':').collect();
        assert!(names.contains(&"From") && names.contains(&"Subject"), "{h}");
        assert!(h.split("\r\n").all(|l| l.len() <= 78), "{h}");
        assert!(
            h.split("\r\n")
                .skip(1)
                .all(|l| l.is_empty() || l.starts_with('\t')),
            "{h}"
        );
    }

    #[test]
    fn bad_keys_are_named_and_never_echoed() {
        let e = Signer::new(&cfg(DkimAlgorithm::RsaSha256, ED25519_PEM)).unwrap_err();
        let t = e.to_string();
        assert!(
            t.contains("s1") && t.contains("example.com") && t.contains("not an RSA"),
            "{t}"
        );
        assert!(!t.contains("MC4CAQAw"), "{t}");
        let e = Signer::new(&cfg(DkimAlgorithm::Ed25519Sha256, "garbage SECRET")).unwrap_err();
        let t = e.to_string();
        assert!(
            t.contains("not a PEM private key") && !t.contains("SECRET"),
            "{t}"
        );
        let mut c = cfg(DkimAlgorithm::Ed25519Sha256, ED25519_PEM);
        c.selector.clear();
        assert!(Signer::new(&c).is_err());
    }
}
