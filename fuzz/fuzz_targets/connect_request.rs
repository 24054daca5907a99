//! The CONNECT ingress on hostile request bytes.
//!
//! Input: what a client sends on the CONNECT port. The bytes go through
//! hyper's HTTP/1 server, as on the real listener (`.with_upgrades()`),
//! and every request head hyper accepts goes to
//! `tunnel_server::connect::route`, the function the ingress calls before
//! it dials. A target stands in for the dial with a `200`.
//! Checks:
//! - no panic, in hyper or in `route`;
//! - a target is one the request named: a node name is valid, the port is
//!   the URI's port, the host is the URI's host, and the target's text form
//!   parses back to the same target; an absolute-form `http://` request
//!   is forwarded (port 80 when none is given), nothing else is;
//! - a refusal is a 400 or a 405 (with `Allow: CONNECT`) and says why;
//! - `parse_target` on the raw input (when it is UTF-8) keeps the same
//!   round-trip promise.
#![no_main]

use std::convert::Infallible;
use std::future::{ready, Future};
use std::io;
use std::net::IpAddr;
use std::pin::{pin, Pin};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use libfuzzer_sys::fuzz_target;
use tunnel_server::connect::{parse_target, route};
use tunnel_server::dial::Target;

/// A client connection in memory: reads give the input in chunks, then
/// EOF; writes are kept. Owned and `Send`, as `.with_upgrades()` wants.
struct Client {
    input: Bytes,
    chunk: usize,
    written: Arc<Mutex<Vec<u8>>>,
}

impl Read for Client {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        mut buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        let n = self.chunk.min(buf.remaining()).min(self.input.len());
        let piece = self.input.split_to(n);
        buf.put_slice(&piece);
        Poll::Ready(Ok(()))
    }
}

impl Write for Client {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.written.lock().unwrap().extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Polls a future whose I/O is all in memory until it completes.
fn run<F: Future>(f: F) -> F::Output {
    let mut f = pin!(f);
    let mut cx = Context::from_waker(Waker::noop());
    for _ in 0..100_000 {
        if let Poll::Ready(out) = f.as_mut().poll(&mut cx) {
            return out;
        }
    }
    panic!("an in-memory HTTP connection did not finish");
}

/// The checks on what `route` made of one request head.
fn check_route<B>(req: &Request<B>) -> Response<Full<Bytes>> {
    match route(req) {
        Ok(route) => {
            let target = route.target;
            let uri = req.uri();
            // A CONNECT names host:port; an absolute-form http:// request
            // may leave the port to its default.
            assert_eq!(route.forward, req.method() != hyper::Method::CONNECT, "{uri}");
            assert!(!route.forward || uri.scheme_str() == Some("http"), "{uri}");
            let host = uri.host().expect("a target needs a host");
            let host = host.trim_start_matches('[').trim_end_matches(']');
            let port = match &target {
                Target::Address(addr) => {
                    assert_eq!(host.parse::<IpAddr>().ok(), Some(addr.ip()), "{uri}");
                    addr.port()
                }
                Target::Node { name, port } => {
                    certs::identity::validate_node_name(name).expect("a valid node name");
                    assert_eq!(host, name, "{uri}");
                    *port
                }
            };
            let default = if route.forward { Some(80) } else { None };
            assert_eq!(uri.port_u16().or(default), Some(port), "port of {uri}");
            assert_eq!(parse_target(&target.to_string()), Ok(target.clone()));
            Response::new(Full::new(Bytes::new()))
        }
        Err(resp) => {
            match resp.status() {
                StatusCode::BAD_REQUEST => {}
                StatusCode::METHOD_NOT_ALLOWED => {
                    assert_eq!(resp.headers()[hyper::header::ALLOW], "CONNECT");
                }
                other => panic!("route answered {other}"),
            }
            let body = run(resp.body().clone().collect()).unwrap().to_bytes();
            assert!(body.len() > 1, "a refusal says why");
            *resp
        }
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(target) = parse_target(text) {
            assert_eq!(parse_target(&target.to_string()), Ok(target.clone()));
            if let Target::Node { name, .. } = &target {
                certs::identity::validate_node_name(name).expect("a valid node name");
            }
        }
    }
    // Whole, and in uneven pieces chosen by the first byte.
    let pieces = data.first().map_or(1, |b| usize::from(b % 13) + 1);
    let input = Bytes::copy_from_slice(data);
    for chunk in [usize::MAX, pieces] {
        let written = Arc::new(Mutex::new(Vec::new()));
        let client = Client {
            input: input.clone(),
            chunk,
            written: written.clone(),
        };
        let service = service_fn(|req: Request<hyper::body::Incoming>| {
            ready(Ok::<_, Infallible>(check_route(&req)))
        });
        let conn = http1::Builder::new()
            .serve_connection(client, service)
            .with_upgrades();
        // Errors are hostile input that hyper turned away.
        let _ = run(conn);
        let written = written.lock().unwrap();
        if !written.is_empty() {
            // HTTP/1.1, or HTTP/1.0 to a 1.0 request.
            assert!(written.starts_with(b"HTTP/1."), "{:?}", &written[..]);
        }
    }
});
