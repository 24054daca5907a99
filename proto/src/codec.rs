//! Framing and the codec.
//!
//! A frame is `type: u8 | length: u16 (big endian) | body: [u8; length]`,
//! with `length <= MAX_FRAME_BODY`. [`decode`] first checks that a whole
//! frame is buffered (`Ok(None)` asks for more bytes) and only then parses
//! it, so a partial frame costs no allocation. Fields added by a later minor
//! version are appended to a body; a decoder ignores bytes after the fields
//! it knows.
//!
//! Human-readable reasons (`Refuse`, `DialResult`, `GoAway`) never fail to
//! encode: one longer than [`MAX_REASON`] is cut on a character boundary
//! and ends in `…` ([`truncate_reason`]). Losing the end of an explanation
//! is better than losing the answer it explains (a 403 turning into a 502).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::message::*;
use crate::{MAX_ADDRESSES, MAX_CSR, MAX_ISSUED_PEM, MAX_NODE_NAME, MAX_REASON, MAX_TOKEN};

/// Bytes of frame header before the body.
pub const FRAME_HEADER_LEN: usize = 3;
/// Largest frame body. Control messages are small; anything bigger is an
/// attack or a bug.
pub const MAX_FRAME_BODY: usize = 16 * 1024;

const T_HELLO: u8 = 0x01;
const T_WELCOME: u8 = 0x02;
const T_REFUSE: u8 = 0x03;
const T_DIAL: u8 = 0x10;
const T_DIAL_RESULT: u8 = 0x11;
const T_DRAIN: u8 = 0x20;
const T_GOAWAY: u8 = 0x21;
const T_REPLICAS: u8 = 0x22;
const T_ENROLL: u8 = 0x30;
const T_RENEW: u8 = 0x31;
const T_ISSUED: u8 = 0x32;

/// Why bytes could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("frame body of {len} bytes exceeds the limit of {MAX_FRAME_BODY} bytes")]
    Oversize { len: usize },
    #[error("unknown frame type 0x{0:02x}")]
    UnknownType(u8),
    #[error("{message} frame is truncated: {field} is missing")]
    Truncated {
        message: &'static str,
        field: &'static str,
    },
    #[error("{message} frame: {field} is {len} long, the limit is {max}")]
    FieldTooLong {
        message: &'static str,
        field: &'static str,
        len: usize,
        max: usize,
    },
    #[error("{message} frame: {field} is not valid UTF-8")]
    InvalidUtf8 {
        message: &'static str,
        field: &'static str,
    },
    #[error("{message} frame: unknown address family {family}")]
    UnknownAddressFamily { message: &'static str, family: u8 },
}

/// Why a message could not be encoded (a field over its limit).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot encode {message}: {field} is {len} long, the limit is {max}")]
pub struct EncodeError {
    pub message: &'static str,
    pub field: &'static str,
    pub len: usize,
    pub max: usize,
}

/// Appends the frame for `msg` to `dst`.
pub fn encode(msg: &Message, dst: &mut Vec<u8>) -> Result<(), EncodeError> {
    let start = dst.len();
    dst.extend_from_slice(&[0, 0, 0]);
    let mut w = Writer {
        buf: dst,
        message: msg.kind(),
    };
    let ty = match msg {
        Message::Hello(h) => {
            w.u8(h.version_major);
            w.u8(h.version_minor);
            w.str("node", &h.node, MAX_NODE_NAME)?;
            w.len_u8("addresses", h.addresses.len(), MAX_ADDRESSES)?;
            for a in &h.addresses {
                w.ip(*a);
            }
            w.u32(h.capabilities);
            w.u64(h.instance);
            w.str("previous", &h.previous, MAX_NODE_NAME)?;
            T_HELLO
        }
        Message::Welcome(m) => {
            w.u8(m.version_major);
            w.u8(m.version_minor);
            w.str("server_id", &m.server_id, MAX_NODE_NAME)?;
            w.u16(m.replicas);
            T_WELCOME
        }
        Message::Refuse(r) => {
            w.u16(r.code.to_wire());
            w.reason(&r.reason);
            T_REFUSE
        }
        Message::Dial(d) => {
            w.ip(d.target.ip());
            w.u16(d.target.port());
            w.u32(d.deadline_ms);
            w.u8(if d.optimistic {
                dial_flags::OPTIMISTIC
            } else {
                0
            });
            T_DIAL
        }
        Message::DialResult(r) => {
            w.u8(r.code.to_wire());
            w.reason(&r.message);
            T_DIAL_RESULT
        }
        Message::Drain => T_DRAIN,
        Message::GoAway(g) => {
            w.u32(g.code);
            w.reason(&g.reason);
            T_GOAWAY
        }
        Message::Enroll(e) => {
            w.u8(e.version_major);
            w.u8(e.version_minor);
            w.str("token", &e.token, MAX_TOKEN)?;
            w.bytes("csr", &e.csr, MAX_CSR)?;
            T_ENROLL
        }
        Message::Renew(r) => {
            w.bytes("csr", &r.csr, MAX_CSR)?;
            T_RENEW
        }
        Message::Issued(i) => {
            w.str("certificate", &i.certificate, MAX_ISSUED_PEM)?;
            w.str("ca", &i.ca, MAX_ISSUED_PEM)?;
            T_ISSUED
        }
        Message::Replicas(n) => {
            w.u16(*n);
            T_REPLICAS
        }
    };
    let body = dst.len() - start - FRAME_HEADER_LEN;
    // Field limits keep every body far below MAX_FRAME_BODY.
    debug_assert!(body <= MAX_FRAME_BODY);
    dst[start] = ty;
    dst[start + 1..start + 3].copy_from_slice(&(body as u16).to_be_bytes());
    Ok(())
}

/// Decodes one frame from the front of `buf`.
///
/// Returns `Ok(None)` when `buf` does not yet hold a whole frame, and
/// `Ok(Some((message, consumed)))` otherwise.
pub fn decode(buf: &[u8]) -> Result<Option<(Message, usize)>, DecodeError> {
    if buf.len() < FRAME_HEADER_LEN {
        return Ok(None);
    }
    let ty = buf[0];
    let len = u16::from_be_bytes([buf[1], buf[2]]) as usize;
    if len > MAX_FRAME_BODY {
        return Err(DecodeError::Oversize { len });
    }
    let message = match ty {
        T_HELLO => "Hello",
        T_WELCOME => "Welcome",
        T_REFUSE => "Refuse",
        T_DIAL => "Dial",
        T_DIAL_RESULT => "DialResult",
        T_DRAIN => "Drain",
        T_GOAWAY => "GoAway",
        T_REPLICAS => "Replicas",
        T_ENROLL => "Enroll",
        T_RENEW => "Renew",
        T_ISSUED => "Issued",
        other => return Err(DecodeError::UnknownType(other)),
    };
    if buf.len() < FRAME_HEADER_LEN + len {
        return Ok(None);
    }
    let mut r = Reader {
        buf: &buf[FRAME_HEADER_LEN..FRAME_HEADER_LEN + len],
        message,
    };
    let msg = match ty {
        T_HELLO => {
            let version_major = r.u8("version")?;
            let version_minor = r.u8("version")?;
            let node = r.str("node", MAX_NODE_NAME)?;
            let count = r.u8("address count")? as usize;
            if count > MAX_ADDRESSES {
                return Err(r.too_long("addresses", count, MAX_ADDRESSES));
            }
            let mut addresses = Vec::with_capacity(count);
            for _ in 0..count {
                addresses.push(r.ip("address")?);
            }
            let capabilities = r.u32("capabilities")?;
            // Added in minor version 1: an older agent's Hello ends here.
            let (instance, previous) = if r.buf.is_empty() {
                (0, String::new())
            } else {
                (r.u64("instance")?, r.str("previous", MAX_NODE_NAME)?)
            };
            Message::Hello(Hello {
                version_major,
                version_minor,
                node,
                addresses,
                capabilities,
                instance,
                previous,
            })
        }
        T_WELCOME => Message::Welcome(Welcome {
            version_major: r.u8("version")?,
            version_minor: r.u8("version")?,
            server_id: r.str("server_id", MAX_NODE_NAME)?,
            // Added in minor version 1: an older server's Welcome ends here.
            replicas: if r.buf.is_empty() {
                0
            } else {
                r.u16("replicas")?
            },
        }),
        T_REFUSE => Message::Refuse(Refusal {
            code: RefuseCode::from_wire(r.u16("code")?),
            reason: r.str("reason", MAX_REASON)?,
        }),
        T_DIAL => {
            let ip = r.ip("target")?;
            let port = r.u16("port")?;
            let deadline_ms = r.u32("deadline")?;
            // Added in minor version 3: an older server's Dial ends here.
            // Unknown bits are ignored (room for later additions).
            let flags = if r.buf.is_empty() { 0 } else { r.u8("flags")? };
            Message::Dial(DialRequest {
                target: SocketAddr::new(ip, port),
                deadline_ms,
                optimistic: flags & dial_flags::OPTIMISTIC != 0,
            })
        }
        T_DIAL_RESULT => Message::DialResult(DialResult {
            code: DialCode::from_wire(r.u8("code")?),
            message: r.str("message", MAX_REASON)?,
        }),
        T_DRAIN => Message::Drain,
        T_GOAWAY => Message::GoAway(GoAway {
            code: r.u32("code")?,
            reason: r.str("reason", MAX_REASON)?,
        }),
        T_REPLICAS => Message::Replicas(r.u16("replicas")?),
        T_ENROLL => Message::Enroll(Enroll {
            version_major: r.u8("version")?,
            version_minor: r.u8("version")?,
            token: r.str("token", MAX_TOKEN)?,
            csr: r.bytes("csr", MAX_CSR)?,
        }),
        T_RENEW => Message::Renew(Renew {
            csr: r.bytes("csr", MAX_CSR)?,
        }),
        T_ISSUED => Message::Issued(Issued {
            certificate: r.str("certificate", MAX_ISSUED_PEM)?,
            ca: r.str("ca", MAX_ISSUED_PEM)?,
        }),
        _ => unreachable!("frame type checked above"),
    };
    Ok(Some((msg, FRAME_HEADER_LEN + len)))
}

/// What ends a reason that was cut short.
const ELLIPSIS: &str = "…";

/// `reason` as it goes on the wire: unchanged if it fits in [`MAX_REASON`]
/// bytes, else cut on a character boundary so that, with a trailing `…`,
/// it fits.
pub fn truncate_reason(reason: &str) -> std::borrow::Cow<'_, str> {
    if reason.len() <= MAX_REASON {
        return reason.into();
    }
    let mut end = MAX_REASON - ELLIPSIS.len();
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{ELLIPSIS}", &reason[..end]).into()
}

struct Writer<'a> {
    buf: &'a mut Vec<u8>,
    message: &'static str,
}

impl Writer<'_> {
    fn u8(&mut self, v: u8) {
        self.buf.push(v);
    }
    fn u16(&mut self, v: u16) {
        self.buf.extend_from_slice(&v.to_be_bytes());
    }
    fn u32(&mut self, v: u32) {
        self.buf.extend_from_slice(&v.to_be_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.buf.extend_from_slice(&v.to_be_bytes());
    }
    fn len_u8(&mut self, field: &'static str, len: usize, max: usize) -> Result<(), EncodeError> {
        self.check(field, len, max)?;
        self.u8(len as u8);
        Ok(())
    }
    fn str(&mut self, field: &'static str, s: &str, max: usize) -> Result<(), EncodeError> {
        self.check(field, s.len(), max)?;
        self.u16(s.len() as u16);
        self.buf.extend_from_slice(s.as_bytes());
        Ok(())
    }
    fn bytes(&mut self, field: &'static str, b: &[u8], max: usize) -> Result<(), EncodeError> {
        self.check(field, b.len(), max)?;
        self.u16(b.len() as u16);
        self.buf.extend_from_slice(b);
        Ok(())
    }
    /// A human-readable reason: cut to [`MAX_REASON`], never an error.
    fn reason(&mut self, s: &str) {
        let s = truncate_reason(s);
        self.u16(s.len() as u16);
        self.buf.extend_from_slice(s.as_bytes());
    }
    fn ip(&mut self, ip: IpAddr) {
        match ip {
            IpAddr::V4(v4) => {
                self.u8(4);
                self.buf.extend_from_slice(&v4.octets());
            }
            IpAddr::V6(v6) => {
                self.u8(6);
                self.buf.extend_from_slice(&v6.octets());
            }
        }
    }
    fn check(&self, field: &'static str, len: usize, max: usize) -> Result<(), EncodeError> {
        if len > max {
            return Err(EncodeError {
                message: self.message,
                field,
                len,
                max,
            });
        }
        Ok(())
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    message: &'static str,
}

impl<'a> Reader<'a> {
    fn take(&mut self, field: &'static str, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError::Truncated {
                message: self.message,
                field,
            });
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }
    fn u8(&mut self, field: &'static str) -> Result<u8, DecodeError> {
        Ok(self.take(field, 1)?[0])
    }
    fn u16(&mut self, field: &'static str) -> Result<u16, DecodeError> {
        let b = self.take(field, 2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        let b = self.take(field, 4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self, field: &'static str) -> Result<u64, DecodeError> {
        let b = self.take(field, 8)?;
        Ok(u64::from_be_bytes(b.try_into().expect("8 bytes taken")))
    }
    fn str(&mut self, field: &'static str, max: usize) -> Result<String, DecodeError> {
        let len = self.u16(field)? as usize;
        if len > max {
            return Err(self.too_long(field, len, max));
        }
        let bytes = self.take(field, len)?;
        std::str::from_utf8(bytes)
            .map(str::to_owned)
            .map_err(|_| DecodeError::InvalidUtf8 {
                message: self.message,
                field,
            })
    }
    fn bytes(&mut self, field: &'static str, max: usize) -> Result<Vec<u8>, DecodeError> {
        let len = self.u16(field)? as usize;
        if len > max {
            return Err(self.too_long(field, len, max));
        }
        Ok(self.take(field, len)?.to_vec())
    }
    fn ip(&mut self, field: &'static str) -> Result<IpAddr, DecodeError> {
        match self.u8(field)? {
            4 => {
                let b: [u8; 4] = self.take(field, 4)?.try_into().expect("length checked");
                Ok(IpAddr::V4(Ipv4Addr::from(b)))
            }
            6 => {
                let b: [u8; 16] = self.take(field, 16)?.try_into().expect("length checked");
                Ok(IpAddr::V6(Ipv6Addr::from(b)))
            }
            family => Err(DecodeError::UnknownAddressFamily {
                message: self.message,
                family,
            }),
        }
    }
    fn too_long(&self, field: &'static str, len: usize, max: usize) -> DecodeError {
        DecodeError::FieldTooLong {
            message: self.message,
            field,
            len,
            max,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_ip() -> impl Strategy<Value = IpAddr> {
        prop_oneof![
            any::<[u8; 4]>().prop_map(|b| IpAddr::V4(b.into())),
            any::<[u8; 16]>().prop_map(|b| IpAddr::V6(b.into())),
        ]
    }

    fn arb_message() -> impl Strategy<Value = Message> {
        prop_oneof![
            (
                any::<u8>(),
                any::<u8>(),
                "[a-z0-9.-]{0,253}",
                prop::collection::vec(arb_ip(), 0..=MAX_ADDRESSES),
                any::<u32>(),
                any::<u64>(),
                "[a-z0-9-]{0,20}"
            )
                .prop_map(
                    |(a, b, node, addresses, capabilities, instance, previous)| {
                        Message::Hello(Hello {
                            version_major: a,
                            version_minor: b,
                            node,
                            addresses,
                            capabilities,
                            instance,
                            previous,
                        })
                    }
                ),
            (any::<u8>(), any::<u8>(), "\\PC{0,60}", any::<u16>()).prop_map(
                |(a, b, server_id, replicas)| {
                    Message::Welcome(Welcome {
                        version_major: a,
                        version_minor: b,
                        server_id,
                        replicas,
                    })
                }
            ),
            (any::<u16>(), "\\PC{0,200}").prop_map(|(c, reason)| Message::Refuse(Refusal {
                code: RefuseCode::from_wire(c),
                reason
            })),
            (arb_ip(), any::<u16>(), any::<u32>(), any::<bool>()).prop_map(
                |(ip, port, deadline_ms, optimistic)| {
                    Message::Dial(DialRequest {
                        target: SocketAddr::new(ip, port),
                        deadline_ms,
                        optimistic,
                    })
                }
            ),
            (any::<u8>(), "\\PC{0,200}").prop_map(|(c, message)| {
                Message::DialResult(DialResult {
                    code: DialCode::from_wire(c),
                    message,
                })
            }),
            Just(Message::Drain),
            any::<u16>().prop_map(Message::Replicas),
            (any::<u32>(), "\\PC{0,200}")
                .prop_map(|(code, reason)| Message::GoAway(GoAway { code, reason })),
            (
                any::<u8>(),
                any::<u8>(),
                "[a-z0-9.]{0,64}",
                prop::collection::vec(any::<u8>(), 0..600)
            )
                .prop_map(|(a, b, token, csr)| Message::Enroll(Enroll {
                    version_major: a,
                    version_minor: b,
                    token,
                    csr
                })),
            prop::collection::vec(any::<u8>(), 0..600)
                .prop_map(|csr| Message::Renew(Renew { csr })),
            ("\\PC{0,300}", "\\PC{0,300}")
                .prop_map(|(certificate, ca)| Message::Issued(Issued { certificate, ca })),
        ]
    }

    proptest! {
        #[test]
        fn round_trip(msg in arb_message(), tail in prop::collection::vec(any::<u8>(), 0..8)) {
            let mut buf = Vec::new();
            encode(&msg, &mut buf).unwrap();
            let frame_len = buf.len();
            buf.extend_from_slice(&tail);
            let (decoded, used) = decode(&buf).unwrap().unwrap();
            prop_assert_eq!(decoded, msg);
            prop_assert_eq!(used, frame_len);
        }

        #[test]
        fn every_prefix_asks_for_more(msg in arb_message()) {
            let mut buf = Vec::new();
            encode(&msg, &mut buf).unwrap();
            for cut in 0..buf.len() {
                prop_assert_eq!(decode(&buf[..cut]), Ok(None));
            }
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            if let Ok(Some((_, used))) = decode(&bytes) {
                prop_assert!(used <= bytes.len());
            }
        }

        #[test]
        fn corrupted_frames_never_panic(msg in arb_message(), pos in any::<prop::sample::Index>(), byte in any::<u8>()) {
            let mut buf = Vec::new();
            encode(&msg, &mut buf).unwrap();
            let i = pos.index(buf.len());
            buf[i] = byte;
            let _ = decode(&buf);
        }
    }

    #[test]
    fn rejects_oversize_header_before_body_arrives() {
        let buf = [T_DIAL, 0xff, 0xff];
        assert_eq!(decode(&buf), Err(DecodeError::Oversize { len: 0xffff }));
    }

    #[test]
    fn rejects_unknown_type() {
        assert_eq!(decode(&[0x7f, 0, 0]), Err(DecodeError::UnknownType(0x7f)));
    }

    #[test]
    fn rejects_truncated_body() {
        // A Dial whose body claims 2 bytes: family 4 but no address.
        let err = decode(&[T_DIAL, 0, 2, 4, 1]).unwrap_err();
        assert_eq!(
            err,
            DecodeError::Truncated {
                message: "Dial",
                field: "target"
            }
        );
        assert!(err.to_string().contains("Dial frame is truncated"));
    }

    #[test]
    fn rejects_bad_family_and_utf8() {
        assert!(matches!(
            decode(&[T_DIAL, 0, 1, 9]),
            Err(DecodeError::UnknownAddressFamily { family: 9, .. })
        ));
        assert!(matches!(
            decode(&[T_DIAL_RESULT, 0, 4, 1, 0, 1, 0xff]),
            Err(DecodeError::InvalidUtf8 { .. })
        ));
    }

    #[test]
    fn long_reasons_are_cut_on_a_char_boundary() {
        assert_eq!(truncate_reason("short"), "short");
        let exact = "x".repeat(MAX_REASON);
        assert_eq!(truncate_reason(&exact), exact);
        // A 4-byte character straddles every possible cut point in turn.
        for pad in 0..4 {
            let long = format!("{}{}", "a".repeat(MAX_REASON - 4 - pad), "🦀".repeat(10));
            let cut = truncate_reason(&long);
            assert!(cut.len() <= MAX_REASON, "pad {pad}: {}", cut.len());
            assert!(cut.len() > MAX_REASON - 4 - ELLIPSIS.len(), "pad {pad}");
            assert!(cut.ends_with("🦀…") || cut.ends_with("a…"), "pad {pad}");
            assert!(long.starts_with(cut.trim_end_matches(ELLIPSIS)));
        }
    }

    #[test]
    fn an_overlong_dial_result_still_encodes() {
        // An allow-list of 40 entries in a refusal: the answer must arrive.
        let message = "ü".repeat(MAX_REASON);
        for msg in [
            Message::DialResult(DialResult::error(DialCode::NotAllowed, message.clone())),
            Message::Refuse(Refusal {
                code: RefuseCode::BadCertificate,
                reason: message.clone(),
            }),
            Message::GoAway(GoAway {
                code: 1,
                reason: message.clone(),
            }),
        ] {
            let mut buf = Vec::new();
            encode(&msg, &mut buf).unwrap();
            let (decoded, _) = decode(&buf).unwrap().unwrap();
            let text = match decoded {
                Message::DialResult(r) => {
                    assert_eq!(r.code, DialCode::NotAllowed);
                    r.message
                }
                Message::Refuse(r) => r.reason,
                Message::GoAway(g) => g.reason,
                other => panic!("{other:?}"),
            };
            assert!(text.len() <= MAX_REASON);
            assert!(text.ends_with("ü…"), "{text}");
        }
    }

    #[test]
    fn a_welcome_without_the_replica_count_is_read_as_unknown() {
        // Minor version 0: server_id is the last field.
        let body = [1u8, 0, 0, 2, b's', b'1'];
        let mut frame = vec![T_WELCOME];
        frame.extend_from_slice(&(body.len() as u16).to_be_bytes());
        frame.extend_from_slice(&body);
        let (msg, used) = decode(&frame).unwrap().unwrap();
        assert_eq!(used, frame.len());
        assert_eq!(
            msg,
            Message::Welcome(Welcome {
                version_major: 1,
                version_minor: 0,
                server_id: "s1".into(),
                replicas: 0,
            })
        );
        // Minor version 1 carries it.
        let mut buf = Vec::new();
        let welcome = Message::Welcome(Welcome {
            version_major: 1,
            version_minor: 1,
            server_id: "s1".into(),
            replicas: 3,
        });
        encode(&welcome, &mut buf).unwrap();
        assert_eq!(decode(&buf).unwrap().unwrap().0, welcome);
        // A truncated count (one byte) is an error, not a guess.
        let mut short = buf.clone();
        short.pop();
        short[1..3].copy_from_slice(&((buf.len() - FRAME_HEADER_LEN - 1) as u16).to_be_bytes());
        assert!(decode(&short).is_err());
    }

    #[test]
    fn a_dial_without_flags_is_awaited_and_unknown_flag_bits_are_ignored() {
        // Minor version 2 and older: the deadline is the last field.
        let body = [4u8, 198, 18, 1, 2, 0x27, 0x10, 0, 0, 0x13, 0x88];
        let mut frame = vec![T_DIAL];
        frame.extend_from_slice(&(body.len() as u16).to_be_bytes());
        frame.extend_from_slice(&body);
        let expected = DialRequest {
            target: "198.18.1.2:10000".parse().unwrap(),
            deadline_ms: 5000,
            optimistic: false,
        };
        assert_eq!(
            decode(&frame).unwrap().unwrap().0,
            Message::Dial(expected.clone())
        );
        // Minor version 3 adds the flags; bits it does not know are ignored.
        let mut flagged = frame.clone();
        flagged.push(0xff);
        flagged[1..3].copy_from_slice(&((body.len() + 1) as u16).to_be_bytes());
        assert_eq!(
            decode(&flagged).unwrap().unwrap().0,
            Message::Dial(DialRequest {
                optimistic: true,
                ..expected.clone()
            })
        );
        flagged[FRAME_HEADER_LEN + body.len()] = 0xfe;
        assert_eq!(
            decode(&flagged).unwrap().unwrap().0,
            Message::Dial(expected)
        );
    }

    #[test]
    fn a_hello_without_instance_is_read_as_unknown() {
        // Minor version 0: capabilities is the last field.
        let body = [1u8, 0, 0, 1, b'n', 0, 0, 0, 0, 2];
        let mut frame = vec![T_HELLO];
        frame.extend_from_slice(&(body.len() as u16).to_be_bytes());
        frame.extend_from_slice(&body);
        match decode(&frame).unwrap().unwrap().0 {
            Message::Hello(h) => {
                assert_eq!(h.capabilities, 2);
                assert_eq!(h.instance, 0);
                assert!(h.previous.is_empty());
            }
            other => panic!("{other:?}"),
        }
        // A cut instance is an error, not a guess.
        let mut frame = frame.clone();
        frame.extend_from_slice(&[0, 0, 1]);
        let len = (frame.len() - FRAME_HEADER_LEN) as u16;
        frame[1..3].copy_from_slice(&len.to_be_bytes());
        assert!(decode(&frame).is_err());
    }

    #[test]
    fn rejects_overlong_fields() {
        let hello = Message::Hello(Hello {
            version_major: 1,
            version_minor: 0,
            node: "n".repeat(MAX_NODE_NAME + 1),
            addresses: vec![],
            capabilities: 0,
            instance: 0,
            previous: String::new(),
        });
        let err = encode(&hello, &mut Vec::new()).unwrap_err();
        assert_eq!(err.field, "node");
        // Hand-built frame with 33 addresses.
        let mut body = vec![1, 0, 0, 1, b'n', (MAX_ADDRESSES + 1) as u8];
        body.extend(std::iter::repeat_n([4u8, 1, 2, 3, 4], MAX_ADDRESSES + 1).flatten());
        body.extend_from_slice(&[0, 0, 0, 0]);
        let mut frame = vec![T_HELLO];
        frame.extend_from_slice(&(body.len() as u16).to_be_bytes());
        frame.extend_from_slice(&body);
        assert!(matches!(
            decode(&frame),
            Err(DecodeError::FieldTooLong {
                field: "addresses",
                ..
            })
        ));
    }
}
