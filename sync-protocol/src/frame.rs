//! Framing: a 4-byte big-endian length, then that many bytes of one postcard message.
//!
//! The decoder buffers at most one frame, refuses a length above its maximum as soon as
//! the prefix arrives (before buffering anything), and reports malformed, unknown or
//! trailing content as typed errors. It never panics on any input.

use serde::{Serialize, de::DeserializeOwned};

/// Default upper bound of one frame's payload.
pub const DEFAULT_MAX_FRAME_LEN: usize = 4 * 1024 * 1024;
const PREFIX: usize = 4;

/// What was wrong with incoming bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    Oversized { len: usize, max: usize },
    #[error("stream ended inside a frame ({have} of {need} bytes received)")]
    Truncated { have: usize, need: usize },
    #[error("empty frame")]
    Empty,
    #[error("unknown message type (a newer peer?): {0}")]
    UnknownMessage(String),
    #[error("malformed message: {0}")]
    Malformed(String),
    #[error("{0} bytes left over after the message inside one frame")]
    TrailingBytes(usize),
}

/// Encodes `msg` as one frame. Fails only if the message exceeds `max_len`.
pub fn encode<T: Serialize>(msg: &T, max_len: usize) -> Result<Vec<u8>, FrameError> {
    let mut out = vec![0u8; PREFIX];
    out = postcard::to_extend(msg, out).map_err(|e| FrameError::Malformed(e.to_string()))?;
    let len = out.len() - PREFIX;
    if len > max_len {
        return Err(FrameError::Oversized { len, max: max_len });
    }
    out[..PREFIX].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(out)
}

/// A top-level message type: an enum whose variant index leads every frame.
pub trait Message: Serialize + DeserializeOwned {
    /// Number of variants this version knows; a higher index is a message from a newer peer.
    const KINDS: u32;
}

/// Decodes one message from exactly one frame's payload.
pub fn decode_payload<T: Message>(payload: &[u8]) -> Result<T, FrameError> {
    if payload.is_empty() {
        return Err(FrameError::Empty);
    }
    if let Ok((kind, _)) = postcard::take_from_bytes::<u32>(payload)
        && kind >= T::KINDS
    {
        return Err(FrameError::UnknownMessage(format!(
            "message type {kind}, this side knows 0..{}",
            T::KINDS
        )));
    }
    match postcard::take_from_bytes::<T>(payload) {
        Ok((msg, [])) => Ok(msg),
        Ok((_, rest)) => Err(FrameError::TrailingBytes(rest.len())),
        Err(e) => Err(FrameError::Malformed(e.to_string())),
    }
}

/// Incremental frame decoder: push bytes as they arrive, pop whole messages.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    max_len: usize,
}

impl FrameDecoder {
    pub fn new(max_len: usize) -> Self {
        Self {
            buf: Vec::new(),
            max_len,
        }
    }

    /// Changes the largest frame accepted from now on.
    pub fn set_max_len(&mut self, max_len: usize) {
        self.max_len = max_len;
    }

    /// Appends received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes buffered but not yet decoded.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    fn frame_len(&self) -> Option<usize> {
        let prefix: [u8; PREFIX] = self.buf.get(..PREFIX)?.try_into().ok()?;
        Some(u32::from_be_bytes(prefix) as usize)
    }

    /// The next whole message, `Ok(None)` if more bytes are needed. After an error the
    /// stream is unusable: frame boundaries are lost.
    pub fn next_message<T: Message>(&mut self) -> Result<Option<T>, FrameError> {
        let Some(len) = self.frame_len() else {
            return Ok(None);
        };
        if len > self.max_len {
            return Err(FrameError::Oversized {
                len,
                max: self.max_len,
            });
        }
        if self.buf.len() < PREFIX + len {
            // Reserve what this frame needs, bounded by max_len, to avoid regrowth.
            self.buf
                .reserve((PREFIX + len).saturating_sub(self.buf.len()));
            return Ok(None);
        }
        let result = decode_payload(&self.buf[PREFIX..PREFIX + len]);
        self.buf.drain(..PREFIX + len);
        // Don't keep a large frame's buffer around for the life of the connection.
        if self.buf.is_empty() && self.buf.capacity() > 64 * 1024 {
            self.buf = Vec::new();
        }
        result.map(Some)
    }

    /// Call when the stream ended: an incomplete frame is an error.
    pub fn finish(&self) -> Result<(), FrameError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let need = self.frame_len().map_or(PREFIX, |l| PREFIX + l);
        Err(FrameError::Truncated {
            have: self.buf.len(),
            need,
        })
    }
}
