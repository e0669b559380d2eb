//! Framing: `u32` big-endian payload length, then a postcard payload.
//!
//! The length is checked against [`MAX_FRAME`] *before* a buffer is allocated. Both a blocking
//! reader ([`read_frame`]) and an incremental decoder for non-blocking sockets ([`FrameDecoder`])
//! are provided; they share [`check_len`] and [`decode_payload`].

use std::io::{self, Read, Write};

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Largest payload accepted, in bytes. Templates are limited well below this by the governor.
pub const MAX_FRAME: u32 = 16 * 1024 * 1024;

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The peer closed the socket cleanly between frames.
    #[error("peer closed the connection")]
    Eof,
    /// The length prefix exceeds [`MAX_FRAME`]; nothing was allocated.
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    TooLarge {
        /// The announced length.
        len: u32,
        /// The limit, [`MAX_FRAME`].
        max: u32,
    },
    /// The payload is not a valid message (garbage, or a variant this side does not know).
    #[error("undecodable frame: {0}")]
    Decode(#[from] postcard::Error),
    /// The socket failed (or closed in the middle of a frame).
    #[error("i/o error: {0}")]
    Io(#[from] io::Error),
}

/// Checks an announced payload length against [`MAX_FRAME`].
pub fn check_len(len: u32) -> Result<usize, FrameError> {
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge {
            len,
            max: MAX_FRAME,
        });
    }
    Ok(len as usize)
}

/// Encodes `msg` as one complete frame (prefix + payload).
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let mut out = postcard::to_extend(msg, vec![0u8; 4])?;
    let len = u32::try_from(out.len() - 4).unwrap_or(u32::MAX);
    check_len(len)?;
    out[..4].copy_from_slice(&len.to_be_bytes());
    Ok(out)
}

/// Decodes one payload (without its prefix). Trailing bytes are an error.
pub fn decode_payload<T: DeserializeOwned>(payload: &[u8]) -> Result<T, FrameError> {
    let (msg, rest) = postcard::take_from_bytes(payload)?;
    if !rest.is_empty() {
        return Err(FrameError::Decode(postcard::Error::DeserializeBadEncoding));
    }
    Ok(msg)
}

/// Writes one frame and flushes.
pub fn write_frame<W: Write, T: Serialize>(w: &mut W, msg: &T) -> Result<(), FrameError> {
    w.write_all(&encode(msg)?)?;
    w.flush()?;
    Ok(())
}

/// Reads one frame, blocking. A clean close before the first prefix byte is [`FrameError::Eof`].
pub fn read_frame<R: Read, T: DeserializeOwned>(r: &mut R) -> Result<T, FrameError> {
    let mut prefix = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match r.read(&mut prefix[got..]) {
            Ok(0) if got == 0 => return Err(FrameError::Eof),
            Ok(0) => return Err(FrameError::Io(io::ErrorKind::UnexpectedEof.into())),
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let len = check_len(u32::from_be_bytes(prefix))?;
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload)?;
    decode_payload(&payload)
}

/// Incremental decoder for a non-blocking byte stream: feed it bytes, take whole messages out.
#[derive(Debug, Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
}

impl FrameDecoder {
    /// A decoder with an empty buffer.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends bytes read from the stream.
    pub fn extend(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Returns the next complete message, `Ok(None)` when more bytes are needed. After an error
    /// the stream is out of sync and must be abandoned.
    pub fn next_message<T: DeserializeOwned>(&mut self) -> Result<Option<T>, FrameError> {
        if self.buf.len() < 4 {
            return Ok(None);
        }
        let prefix = [self.buf[0], self.buf[1], self.buf[2], self.buf[3]];
        let len = check_len(u32::from_be_bytes(prefix))?;
        if self.buf.len() < 4 + len {
            return Ok(None);
        }
        let msg = decode_payload(&self.buf[4..4 + len]);
        self.buf.drain(..4 + len);
        msg.map(Some)
    }

    /// Bytes buffered but not yet part of a complete frame.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }
}
