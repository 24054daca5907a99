//! The frame decoder on hostile bytes: `proto::decode` and the reader the
//! server and agent really use (`transport::read_message`).
//!
//! Input: the bytes a peer sends on a stream (one or more frames, or junk).
//! Checks:
//! - no panic;
//! - every prefix of a frame asks for more (`Ok(None)`) or fails with the
//!   same header error as the whole, and allocates nothing: a huge length
//!   prefix costs no memory before its body is there;
//! - decoding allocates at most the body plus a bounded address vector;
//! - `read_message`, fed the same bytes in pieces (one byte at a time, and
//!   in uneven chunks), reads the same messages and ends with the same
//!   error, consuming exactly each frame, and never allocates more than
//!   one maximal frame;
//! - whatever decodes re-encodes (never an `EncodeError`), no longer than
//!   it came plus the fields minor version 1 appended, and decodes to the
//!   same message.
#![no_main]

use std::alloc::{GlobalAlloc, Layout, System};
use std::future::Future;
use std::io;
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, Waker};

use libfuzzer_sys::fuzz_target;
use proto::{
    decode, encode, DecodeError, Message, FRAME_HEADER_LEN, MAX_ADDRESSES, MAX_FRAME_BODY,
};
use tokio::io::{AsyncRead, ReadBuf};
use transport::FrameError;

/// Counts the bytes the fuzzed code allocates (the fuzzer runs one thread).
struct Counting;

static ALLOCATED: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATED.fetch_add(layout.size(), Ordering::Relaxed);
        System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCATED.fetch_add(layout.size(), Ordering::Relaxed);
        System.alloc_zeroed(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATED.fetch_add(new_size, Ordering::Relaxed);
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Runs `f` and returns its result and the bytes it allocated.
fn counted<T>(f: impl FnOnce() -> T) -> (T, usize) {
    let before = ALLOCATED.load(Ordering::Relaxed);
    let out = f();
    (out, ALLOCATED.load(Ordering::Relaxed) - before)
}

/// Most a decode may allocate beyond the body: the address vector of a
/// Hello is reserved from its count before the addresses are read.
const ADDRESS_VEC: usize = MAX_ADDRESSES * std::mem::size_of::<std::net::IpAddr>();

/// What one step of reading a stream gives.
#[derive(Debug, PartialEq)]
enum Step {
    Message(Message),
    Error(DecodeError),
    /// The stream ended inside a frame, or before one started.
    Eof,
}

/// A stream that hands out `data` in chunks of the given sizes (cycled).
struct Chunked<'a> {
    data: &'a [u8],
    pos: usize,
    sizes: &'a [usize],
    turn: usize,
}

impl AsyncRead for Chunked<'_> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let size = self.sizes[self.turn % self.sizes.len()];
        self.turn += 1;
        let n = size.min(buf.remaining()).min(self.data.len() - self.pos);
        buf.put_slice(&self.data[self.pos..self.pos + n]);
        self.pos += n;
        Poll::Ready(Ok(()))
    }
}

/// Polls a future that never waits for anything (the reader is in memory).
fn now<F: Future>(f: F) -> F::Output {
    let mut f = pin!(f);
    let mut cx = Context::from_waker(Waker::noop());
    for _ in 0..1000 {
        if let Poll::Ready(out) = f.as_mut().poll(&mut cx) {
            return out;
        }
    }
    panic!("an in-memory read did not complete");
}

/// The stream decoded whole, frame after frame, with the offset after each
/// message.
fn decode_whole(data: &[u8]) -> Vec<(Step, usize)> {
    let mut steps = Vec::new();
    let mut off = 0;
    loop {
        let rest = &data[off..];
        let (decoded, allocated) = counted(|| decode(rest));
        match decoded {
            Ok(Some((msg, used))) => {
                assert!(used >= FRAME_HEADER_LEN && used <= rest.len());
                assert!(used <= FRAME_HEADER_LEN + MAX_FRAME_BODY);
                assert!(
                    allocated <= used + ADDRESS_VEC,
                    "decoding a {used}-byte frame allocated {allocated} bytes"
                );
                check_prefixes(&rest[..used], None);
                round_trip(&msg, used);
                off += used;
                steps.push((Step::Message(msg), off));
            }
            Ok(None) => {
                assert_eq!(allocated, 0, "an incomplete frame allocated");
                steps.push((Step::Eof, off));
                return steps;
            }
            Err(e) => {
                if let DecodeError::Oversize { .. } | DecodeError::UnknownType(_) = e {
                    // Judged on the header alone: nothing allocated, and
                    // every longer prefix gives the same answer.
                    assert_eq!(allocated, 0, "a header error allocated");
                    check_prefixes(rest, Some(&e));
                } else {
                    // A bad body is only judged once it is all there.
                    let len = u16::from_be_bytes([rest[1], rest[2]]) as usize;
                    check_prefixes(&rest[..FRAME_HEADER_LEN + len], None);
                }
                steps.push((Step::Error(e), off));
                return steps;
            }
        }
    }
}

/// Every strict prefix of `frame` asks for more bytes (or, for a header
/// error, fails the same way once the header is there), allocating nothing.
fn check_prefixes(frame: &[u8], header_error: Option<&DecodeError>) {
    for cut in 0..frame.len() {
        let (decoded, allocated) = counted(|| decode(&frame[..cut]));
        assert_eq!(
            allocated, 0,
            "a {cut}-byte prefix allocated {allocated} bytes"
        );
        match header_error {
            Some(e) if cut >= FRAME_HEADER_LEN => assert_eq!(decoded.as_ref(), Err(e)),
            _ => assert_eq!(decoded, Ok(None), "a {cut}-byte prefix of {frame:02x?}"),
        }
    }
}

/// The most bytes re-encoding may add to a frame: the fields minor
/// version 1 appended, which a minor-0 frame lacks and decoding fills in
/// (`Hello`: an 8-byte instance and an empty `previous`; `Welcome`: a
/// 2-byte replica count).
const ADDED_IN_MINOR_1: usize = 8 + 2;

/// A decoded message encodes again, no longer than it arrived plus the
/// fields a minor-0 frame lacks (a later minor version may append fields,
/// which are dropped), and decodes to itself.
fn round_trip(msg: &Message, used: usize) {
    let mut wire = Vec::new();
    encode(msg, &mut wire).expect("a decoded message must encode");
    assert!(
        wire.len() <= used + ADDED_IN_MINOR_1,
        "{} re-encoded longer",
        msg.kind()
    );
    assert_eq!(decode(&wire), Ok(Some((msg.clone(), wire.len()))));
    let mut again = Vec::new();
    encode(msg, &mut again).unwrap();
    assert_eq!(again, wire, "encoding is deterministic");
}

/// The stream as `read_message` reads it, in chunks of `sizes`.
fn read_in_pieces(data: &[u8], sizes: &[usize]) -> Vec<(Step, usize)> {
    let mut r = Chunked {
        data,
        pos: 0,
        sizes,
        turn: 0,
    };
    let mut buf = Vec::new();
    let mut steps = Vec::new();
    loop {
        let (read, allocated) = counted(|| now(transport::read_message(&mut r, &mut buf)));
        assert!(
            allocated <= 2 * (FRAME_HEADER_LEN + MAX_FRAME_BODY) + ADDRESS_VEC,
            "read_message allocated {allocated} bytes"
        );
        match read {
            Ok(msg) => steps.push((Step::Message(msg), r.pos)),
            Err(FrameError::Decode(e)) => {
                steps.push((Step::Error(e), 0));
                return steps;
            }
            Err(FrameError::UnexpectedEof) => {
                steps.push((Step::Eof, 0));
                return steps;
            }
            Err(other) => panic!("unexpected read error: {other}"),
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let whole = decode_whole(data);
    // Only a message says where the reader stands; an error or the end
    // leaves it anywhere in the frame.
    let expected: Vec<(Step, usize)> = whole
        .into_iter()
        .map(|(step, off)| match step {
            Step::Message(_) => (step, off),
            _ => (step, 0),
        })
        .collect();
    assert_eq!(read_in_pieces(data, &[usize::MAX]), expected, "read whole");
    assert_eq!(read_in_pieces(data, &[1]), expected, "read byte by byte");
    // Uneven chunks chosen by the input itself.
    let sizes: Vec<usize> = data
        .iter()
        .take(16)
        .map(|b| usize::from(b % 7) + 1)
        .collect();
    if !sizes.is_empty() {
        assert_eq!(
            read_in_pieces(data, &sizes),
            expected,
            "read in chunks {sizes:?}"
        );
    }
});
