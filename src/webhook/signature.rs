//! `X-Body-Signature` verification: hex HMAC-SHA256 of the raw body, any configured key.

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::config::Secret;

type HmacSha256 = Hmac<Sha256>;

/// Length of a SHA-256 MAC in bytes.
const MAC_LEN: usize = 32;

/// Why a signature header was refused. Never carries the expected value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("X-Body-Signature is not a hex HMAC-SHA256 (64 hex characters)")]
    Malformed,
    #[error("X-Body-Signature does not match the body")]
    Mismatch,
}

/// A parsed signature header: 32 bytes decoded from upper- or lower-case hex.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Signature([u8; MAC_LEN]);

impl Signature {
    pub fn parse(header: &[u8]) -> Result<Self, SignatureError> {
        let header = header.trim_ascii();
        let mut mac = [0u8; MAC_LEN];
        hex::decode_to_slice(header, &mut mac).map_err(|_| SignatureError::Malformed)?;
        Ok(Self(mac))
    }
}

/// Verifies bodies against every key of a rotation.
#[derive(Clone)]
pub struct Verifier {
    keys: Vec<HmacSha256>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Verifier {{ keys: {} [REDACTED] }}", self.keys.len())
    }
}

impl Verifier {
    pub fn new(keys: &[Secret]) -> Self {
        Self {
            keys: keys
                .iter()
                .map(|key| {
                    HmacSha256::new_from_slice(key.expose().as_bytes())
                        .expect("HMAC accepts keys of any length")
                })
                .collect(),
        }
    }

    /// Constant-time check of `signature` against the MAC of `body` under each key. Every
    /// key is tried even after a match, so timing does not tell which key matched.
    pub fn verify(&self, body: &[u8], signature: &Signature) -> Result<(), SignatureError> {
        let mut matched = false;
        for key in &self.keys {
            let mut mac = key.clone();
            mac.update(body);
            matched |= mac.verify_slice(&signature.0).is_ok();
        }
        if matched {
            Ok(())
        } else {
            Err(SignatureError::Mismatch)
        }
    }
}

pub use crate::wire::sign;

#[cfg(test)]
mod tests {
    use super::*;

    fn verifier(keys: &[&str]) -> Verifier {
        Verifier::new(&keys.iter().map(|k| Secret::new(*k)).collect::<Vec<_>>())
    }

    #[test]
    fn accepts_lower_and_upper_case_hex() {
        let body = br#"{"a":1}"#;
        let lower = sign("key", body);
        let v = verifier(&["key"]);
        assert_eq!(
            v.verify(body, &Signature::parse(lower.as_bytes()).unwrap()),
            Ok(())
        );
        let upper = lower.to_uppercase();
        assert_eq!(
            v.verify(body, &Signature::parse(upper.as_bytes()).unwrap()),
            Ok(())
        );
    }

    #[test]
    fn any_rotation_key_verifies() {
        let body = b"[]";
        let v = verifier(&["old", "new"]);
        for key in ["old", "new"] {
            let sig = Signature::parse(sign(key, body).as_bytes()).unwrap();
            assert_eq!(v.verify(body, &sig), Ok(()));
        }
        let other = Signature::parse(sign("other", body).as_bytes()).unwrap();
        assert_eq!(v.verify(body, &other), Err(SignatureError::Mismatch));
    }

    #[test]
    fn a_changed_body_fails() {
        let sig = Signature::parse(sign("key", b"{\"a\":1}").as_bytes()).unwrap();
        assert_eq!(
            verifier(&["key"]).verify(b"{\"a\":2}", &sig),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn malformed_headers_are_refused() {
        let good = sign("key", b"x");
        for bad in [
            "",
            "zz",
            &good[..62],
            &format!("{good}00"),
            &good.replace('a', "g"),
        ] {
            if bad == good {
                continue;
            }
            assert_eq!(
                Signature::parse(bad.as_bytes()),
                Err(SignatureError::Malformed),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn debug_hides_keys() {
        assert!(!format!("{:?}", verifier(&["s3cret"])).contains("s3cret"));
    }
}
