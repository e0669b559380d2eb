//! The IPC frame decoder over arbitrary bytes in arbitrary chunkings.
//!
//! Input: the first byte seeds the chunking (how many bytes each `read`/`extend` delivers, and
//! where a read is interrupted), the rest is the byte stream a hostile or broken peer sends.
//! Both message directions are decoded, by [`FrameDecoder`] (non-blocking side) and by
//! [`read_frame`] (blocking side).
//!
//! Invariants: never a panic; no single allocation above `MAX_FRAME` (beyond what buffering
//! the input itself needs); the two decoders agree message for message and on how the stream
//! ends (clean end, truncated frame, frame too large, undecodable payload); after `Ok(None)`
//! the decoder holds no complete frame; every decoded message re-encodes to something that
//! decodes to the same message.
#![no_main]

use std::alloc::{GlobalAlloc, Layout, System};
use std::fmt::Debug;
use std::io::{self, Read};
use std::sync::atomic::{AtomicUsize, Ordering};

use libfuzzer_sys::fuzz_target;
use protocol::{
    FrameDecoder, FrameError, MAX_FRAME, ToGovernor, ToWorker, decode_payload, encode, read_frame,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Records the largest single allocation made by Rust code during one run.
struct Tracking;

static LARGEST: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded unchanged to the system allocator.
unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LARGEST.fetch_max(l.size(), Ordering::Relaxed);
        unsafe { System.alloc(l) }
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        LARGEST.fetch_max(l.size(), Ordering::Relaxed);
        unsafe { System.alloc_zeroed(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        LARGEST.fetch_max(new, Ordering::Relaxed);
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static ALLOC: Tracking = Tracking;

/// Deterministic chunk sizes from the seed byte (xorshift), 0 meaning "interrupted".
struct Chunks(u32);

impl Chunks {
    fn next(&mut self, max: usize) -> usize {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        self.0 = x;
        // Mostly small chunks (split prefixes), sometimes large ones (many frames at once).
        let n = match x % 8 {
            0 => 0,
            1..=5 => 1 + (x >> 8) as usize % 7,
            _ => 1 + (x >> 8) as usize % 4096,
        };
        n.min(max)
    }
}

/// A reader that hands out the stream in the seeded chunking, with interruptions.
struct Chunked<'a> {
    data: &'a [u8],
    chunks: Chunks,
}

impl Read for Chunked<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.data.is_empty() || buf.is_empty() {
            return Ok(0);
        }
        let n = self.chunks.next(self.data.len().min(buf.len()));
        if n == 0 {
            return Err(io::ErrorKind::Interrupted.into());
        }
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

/// How a decoded stream ended.
#[derive(Debug, PartialEq)]
enum End {
    Clean,
    Truncated,
    TooLarge(u32),
    Undecodable,
}

fn via_decoder<T: DeserializeOwned + Debug>(stream: &[u8], seed: u8) -> (Vec<T>, End) {
    let mut chunks = Chunks(u32::from(seed) * 0x9E37 + 1);
    let mut dec = FrameDecoder::new();
    let mut msgs = Vec::new();
    let mut rest = stream;
    loop {
        let n = chunks.next(rest.len()).max(usize::from(!rest.is_empty()));
        dec.extend(&rest[..n]);
        rest = &rest[n..];
        loop {
            match dec.next_message::<T>() {
                Ok(Some(m)) => msgs.push(m),
                Ok(None) => {
                    // Nothing complete may be left behind.
                    let p = dec.pending();
                    assert!(p <= stream.len(), "pending {p} > stream {}", stream.len());
                    break;
                }
                Err(FrameError::TooLarge { len, max }) => {
                    assert_eq!(max, MAX_FRAME);
                    assert!(len > MAX_FRAME);
                    return (msgs, End::TooLarge(len));
                }
                Err(FrameError::Decode(_)) => return (msgs, End::Undecodable),
                Err(e) => panic!("decoder error that is neither size nor decoding: {e}"),
            }
        }
        if rest.is_empty() {
            return (
                msgs,
                if dec.pending() == 0 {
                    End::Clean
                } else {
                    End::Truncated
                },
            );
        }
    }
}

fn via_reader<T: DeserializeOwned + Debug>(stream: &[u8], seed: u8) -> (Vec<T>, End) {
    let mut r = Chunked {
        data: stream,
        chunks: Chunks(u32::from(seed) * 0x9E37 + 1),
    };
    let mut msgs = Vec::new();
    loop {
        match read_frame::<_, T>(&mut r) {
            Ok(m) => msgs.push(m),
            Err(FrameError::Eof) => return (msgs, End::Clean),
            Err(FrameError::Io(e)) if e.kind() == io::ErrorKind::UnexpectedEof => {
                return (msgs, End::Truncated);
            }
            Err(FrameError::TooLarge { len, .. }) => return (msgs, End::TooLarge(len)),
            Err(FrameError::Decode(_)) => return (msgs, End::Undecodable),
            Err(e) => panic!("reader error from an in-memory stream: {e}"),
        }
    }
}

fn check<T: DeserializeOwned + Serialize + Debug + PartialEq>(stream: &[u8], seed: u8) {
    let (a, end_a) = via_decoder::<T>(stream, seed);
    let (b, end_b) = via_reader::<T>(stream, seed);
    assert_eq!(a, b, "FrameDecoder and read_frame disagree on the messages");
    assert_eq!(
        end_a, end_b,
        "FrameDecoder and read_frame disagree on the end"
    );
    for m in &a {
        let frame = encode(m).expect("a decoded message re-encodes");
        let again: T = decode_payload(&frame[4..]).expect("a re-encoded message decodes");
        assert_eq!(&again, m, "round trip changed the message");
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&seed, stream)) = data.split_first() else {
        return;
    };
    LARGEST.store(0, Ordering::Relaxed);
    check::<ToGovernor>(stream, seed);
    check::<ToWorker>(stream, seed);
    let largest = LARGEST.load(Ordering::Relaxed);
    // Buffering the input itself may take up to about twice its length (Vec doubling).
    let allowed = (MAX_FRAME as usize).max(2 * stream.len() + 64);
    assert!(
        largest <= allowed,
        "an allocation of {largest} bytes (limit {allowed}) for a {}-byte stream",
        stream.len()
    );
});
