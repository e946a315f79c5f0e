//! The pure parts of attestation both sides must compute alike: the quote's
//! qualifying data and the event-log delta.

use sha2::{Digest, Sha256};

/// Label of the keying material exported from a connection's TLS session (RFC 5705 /
/// RFC 8446 §7.5) and mixed into the quote nonce.
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-cairn-attestation";
/// Bytes of exported keying material.
pub const EXPORTER_LEN: usize = 32;

/// The qualifying data the TPM signs: the hub's nonce bound to this connection's TLS
/// session, so a quote relayed from, or replayed into, another connection fails.
pub fn quote_nonce(nonce: &[u8; 32], exporter: &[u8; EXPORTER_LEN]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"cairn quote v1\0");
    h.update(nonce);
    h.update(exporter);
    h.finalize().into()
}

/// What of `log` the agent sends when the hub holds `held` bytes hashing to
/// `held_sha256`: `(offset, bytes from offset)`. The whole log unless it starts with
/// exactly what the hub holds (a reboot or a new firmware log starts again at 0).
pub fn log_delta<'a>(log: &'a [u8], held: u64, held_sha256: &[u8; 32]) -> (u64, &'a [u8]) {
    match usize::try_from(held) {
        Ok(n) if n > 0 && n <= log.len() && Sha256::digest(&log[..n]).as_slice() == held_sha256 => {
            (held, &log[n..])
        }
        _ => (0, log),
    }
}

/// SHA-256 of the bytes a hub holds (what it puts in a challenge).
pub fn log_sha256(held: &[u8]) -> [u8; 32] {
    Sha256::digest(held).into()
}

/// The device's whole log from what the hub held and the delta the agent sent; `None`
/// if the offset does not fit what the hub held.
pub fn log_join(held: &[u8], offset: u64, delta: &[u8]) -> Option<Vec<u8>> {
    match offset {
        0 => Some(delta.to_vec()),
        n if usize::try_from(n).ok() == Some(held.len()) => {
            let mut out = Vec::with_capacity(held.len() + delta.len());
            out.extend_from_slice(held);
            out.extend_from_slice(delta);
            Some(out)
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delta_sends_only_what_the_hub_lacks_and_everything_after_a_change() {
        let log = b"0123456789".to_vec();
        let held = &log[..4];
        let (off, d) = log_delta(&log, 4, &log_sha256(held));
        assert_eq!((off, d), (4, &log[4..]));
        assert_eq!(log_join(held, off, d).unwrap(), log);
        // A different prefix (new boot, other firmware): the whole log.
        let (off, d) = log_delta(&log, 4, &log_sha256(b"abcd"));
        assert_eq!((off, d), (0, &log[..]));
        // The hub claims more than the agent has.
        assert_eq!(log_delta(&log, 11, &log_sha256(&log)).0, 0);
        // An offset that does not match what the hub holds is refused.
        assert!(log_join(held, 3, b"x").is_none());
        assert_eq!(log_join(held, 0, b"xy").unwrap(), b"xy");
    }

    #[test]
    fn the_nonce_depends_on_both_inputs() {
        let a = quote_nonce(&[1; 32], &[2; 32]);
        assert_ne!(a, quote_nonce(&[1; 32], &[3; 32]));
        assert_ne!(a, quote_nonce(&[4; 32], &[2; 32]));
    }
}
