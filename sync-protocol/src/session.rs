//! Pieces both session state machines share.

use std::collections::VecDeque;
use std::time::Duration;

use serde::Serialize;

use crate::frame::{self, FrameDecoder, FrameError, Message};

/// Knobs of a session. The defaults suit a real deployment; tests shorten the timeouts.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    pub max_frame_len: usize,
    /// Largest frame the hub accepts before a session is established (hello, enrollment
    /// request), so unauthenticated peers cannot make it buffer much.
    pub max_handshake_frame_len: usize,
    /// How long the opening exchange (hello → welcome/enrolled/refused) may take.
    pub handshake_timeout: Duration,
    /// How long a batch of reports may stay unacknowledged before the session is
    /// considered dead (QUIC retransmits; this catches a hub that stopped answering).
    pub ack_timeout: Duration,
    /// Most reports in one batch.
    pub max_batch: usize,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            max_frame_len: frame::DEFAULT_MAX_FRAME_LEN,
            max_handshake_frame_len: 64 * 1024,
            handshake_timeout: Duration::from_secs(20),
            ack_timeout: Duration::from_secs(60),
            max_batch: crate::message::MAX_REPORTS_PER_BATCH,
        }
    }
}

/// Why a session ended from the protocol's point of view.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SessionError {
    #[error("bad frame from peer: {0}")]
    Frame(#[from] FrameError),
    #[error("protocol violation by peer: {0}")]
    Protocol(String),
    #[error("peer did not complete the handshake in time")]
    HandshakeTimeout,
    #[error("peer did not acknowledge reports in time")]
    AckTimeout,
    #[error("peer did not answer the attestation challenge in time")]
    EvidenceTimeout,
    #[error("stream closed by peer")]
    Closed,
}

/// Framed input and output of one stream.
#[derive(Debug)]
pub(crate) struct Wire {
    decoder: FrameDecoder,
    out: VecDeque<Vec<u8>>,
    max_frame_len: usize,
}

impl Wire {
    pub(crate) fn new(max_frame_len: usize) -> Self {
        Self {
            decoder: FrameDecoder::new(max_frame_len),
            out: VecDeque::new(),
            max_frame_len,
        }
    }

    /// Changes the largest frame accepted from now on.
    pub(crate) fn set_max_frame_len(&mut self, max: usize) {
        self.decoder.set_max_len(max);
    }

    pub(crate) fn push(&mut self, bytes: &[u8]) {
        self.decoder.push(bytes);
    }

    pub(crate) fn next<T: Message>(&mut self) -> Result<Option<T>, FrameError> {
        self.decoder.next_message()
    }

    /// Why the session ends when the peer closed its side of the stream: a frame cut
    /// short, or simply closed.
    pub(crate) fn end_of_stream(&self) -> SessionError {
        match self.decoder.finish() {
            Err(e) => SessionError::Frame(e),
            Ok(()) => SessionError::Closed,
        }
    }

    pub(crate) fn send<T: Serialize>(&mut self, msg: &T) -> Result<(), FrameError> {
        self.out.push_back(frame::encode(msg, self.max_frame_len)?);
        Ok(())
    }

    pub(crate) fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.out.pop_front()
    }
}
