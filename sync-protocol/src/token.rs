//! Join tokens.
//!
//! A join token is what an operator hands to a new box: `cairn1_` followed by base64url
//! of a token id (8 bytes), a secret (16 bytes) and the SHA-256 fingerprint of the hub
//! CA (32 bytes). The agent uses the fingerprint to authenticate the hub from the first
//! packet (no trust on first use), and sends only id and secret to the hub, which keeps
//! only a hash of the secret.

use base64ct::{Base64UrlUnpadded, Encoding};
use sha2::{Digest, Sha256};

const PREFIX: &str = "cairn1_";
const LEN: usize = 8 + 16 + 32;

/// A parsed join token.
#[derive(Clone, PartialEq, Eq)]
pub struct JoinToken {
    pub id: [u8; 8],
    pub secret: [u8; 16],
    pub ca_fingerprint: [u8; 32],
}

impl std::fmt::Debug for JoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JoinToken")
            .field("id", &self.id_hex())
            .field("secret", &"<redacted>")
            .finish()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error(
        "join token must start with {PREFIX:?}; copy the whole token `cairn-hub token create` printed"
    )]
    Prefix,
    #[error(
        "join token is not valid base64url or has the wrong length; was it cut off when copied?"
    )]
    Encoding,
    #[error("enrollment credential is not <id>.<secret> in hex")]
    Credential,
}

impl JoinToken {
    pub fn encode(&self) -> String {
        let mut raw = Vec::with_capacity(LEN);
        raw.extend_from_slice(&self.id);
        raw.extend_from_slice(&self.secret);
        raw.extend_from_slice(&self.ca_fingerprint);
        format!("{PREFIX}{}", Base64UrlUnpadded::encode_string(&raw))
    }

    pub fn parse(s: &str) -> Result<Self, TokenError> {
        let body = s.trim().strip_prefix(PREFIX).ok_or(TokenError::Prefix)?;
        let raw = Base64UrlUnpadded::decode_vec(body).map_err(|_| TokenError::Encoding)?;
        if raw.len() != LEN {
            return Err(TokenError::Encoding);
        }
        let mut t = JoinToken {
            id: [0; 8],
            secret: [0; 16],
            ca_fingerprint: [0; 32],
        };
        t.id.copy_from_slice(&raw[..8]);
        t.secret.copy_from_slice(&raw[8..24]);
        t.ca_fingerprint.copy_from_slice(&raw[24..]);
        Ok(t)
    }

    pub fn id_hex(&self) -> String {
        hex(&self.id)
    }

    /// What the agent sends in its enrollment request: `<id>.<secret>` in hex.
    pub fn credential(&self) -> String {
        format!("{}.{}", hex(&self.id), hex(&self.secret))
    }

    /// Splits a credential into the token id (hex) and the hash of its secret, which is
    /// all the hub stores.
    pub fn parse_credential(s: &str) -> Result<(String, [u8; 32]), TokenError> {
        let (id, secret) = s.split_once('.').ok_or(TokenError::Credential)?;
        if id.len() != 16
            || secret.len() != 32
            || !(id.bytes().chain(secret.bytes())).all(|b| b.is_ascii_hexdigit())
        {
            return Err(TokenError::Credential);
        }
        Ok((
            id.to_ascii_lowercase(),
            Self::hash_secret(secret.to_ascii_lowercase().as_bytes()),
        ))
    }

    /// Hash of the secret in its hex form.
    pub fn secret_hash(&self) -> [u8; 32] {
        Self::hash_secret(hex(&self.secret).as_bytes())
    }

    fn hash_secret(hex_secret: &[u8]) -> [u8; 32] {
        Sha256::digest(hex_secret).into()
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_credential() {
        let t = JoinToken {
            id: [1; 8],
            secret: [0xab; 16],
            ca_fingerprint: [7; 32],
        };
        let s = t.encode();
        assert!(s.starts_with("cairn1_"));
        assert_eq!(JoinToken::parse(&s).unwrap(), t);
        let (id, hash) = JoinToken::parse_credential(&t.credential()).unwrap();
        assert_eq!(id, t.id_hex());
        assert_eq!(hash, t.secret_hash());
        assert_eq!(JoinToken::parse("nope"), Err(TokenError::Prefix));
        assert_eq!(
            JoinToken::parse(&s[..s.len() - 3]),
            Err(TokenError::Encoding)
        );
        assert!(JoinToken::parse_credential("zz.yy").is_err());
        assert!(!format!("{t:?}").contains("ab"));
    }
}
