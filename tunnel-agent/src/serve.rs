//! Serving a registered connection, written once for both transports:
//! accept one stream per tunneled connection until the connection ends or
//! a drain is asked for; then send `Drain`, answer new dials `Draining`,
//! let open streams finish within the grace period, and close.

use std::sync::Arc;

use proto::codes::close;
use proto::Message;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::Instrument;
use transport::{read_message, write_message};

use crate::connection::{Incoming, ServerConnection};
use crate::dial::{serve_stream, DialPolicy, StreamMode, StreamTrace};
use crate::error::{LostReason, SessionEnd};

/// Serves `conn` until it ends, or until `drain` turns true (then drains).
pub async fn serve(
    conn: ServerConnection,
    mut drain: watch::Receiver<bool>,
    server_draining: tokio::sync::oneshot::Sender<()>,
    replicas: watch::Sender<u16>,
) -> SessionEnd {
    let ServerConnection {
        mut carrier,
        mut control_send,
        mut control_recv,
        window,
        policy,
        drain_grace,
        ..
    } = conn;
    let mut streams = JoinSet::new();
    let spawn = |streams: &mut JoinSet<()>, incoming: Incoming, id: String, draining| {
        let trace = Arc::new(StreamTrace::new(id, policy.server, policy.connection));
        let span = tracing::debug_span!("stream", node = %policy.node, stream = %trace.stream);
        let mode = StreamMode {
            draining,
            stall: Some(window.clone()),
            trace,
        };
        let policy = policy.clone();
        match incoming {
            Incoming::Quic(send, recv) => {
                streams.spawn(serve_stream(policy, send, recv, mode).instrument(span))
            }
            Incoming::H2(send, recv, _) => {
                streams.spawn(serve_stream(policy, send, recv, mode).instrument(span))
            }
        };
    };
    // After Welcome the server says Drain, Replicas or GoAway; an end or an
    // error of the control stream ends the session. Read in one future that lives
    // across the loop: a frame read is not cancel-safe.
    let control = async {
        let mut buf = Vec::new();
        let mut server_draining = Some(server_draining);
        loop {
            match read_message(&mut control_recv, &mut buf).await {
                Ok(Message::GoAway(g)) => return Ok(g),
                Ok(Message::Drain) => {
                    if let Some(tell) = server_draining.take() {
                        let _ = tell.send(());
                    }
                }
                Ok(Message::Replicas(count)) => {
                    replicas.send_if_modified(|said| std::mem::replace(said, count) != count);
                }
                Ok(m) => tracing::debug!("ignoring {} on the control stream", m.kind()),
                Err(e) => return Err(e),
            }
        }
    };
    tokio::pin!(control);
    let lost = loop {
        tokio::select! {
            _ = async { drain.wait_for(|d| *d).await.map(|_| ()) } => break None,
            incoming = carrier.accept() => match incoming {
                Ok(s) => {
                    let id = s.id();
                    spawn(&mut streams, s, id, false);
                    carrier.streams_open(streams.len());
                }
                Err(lost) => break Some(lost),
            },
            Some(_) = streams.join_next(), if !streams.is_empty() => {}
            msg = &mut control => match msg {
                Ok(g) => break Some(LostReason::GoAway(g)),
                Err(e) => break Some(carrier.lost_reason().unwrap_or_else(|| {
                    LostReason::Failed(format!("control stream ended: {e}"))
                })),
            },
        }
    };
    if let Some(lost) = lost {
        return SessionEnd::Lost(lost);
    }

    // Streams that ended but were not reaped yet are not open.
    while streams.try_join_next().is_some() {}
    tracing::info!(active = streams.len(), grace = ?drain_grace, "draining");
    report(&policy, "waiting for it to end");
    let deadline = tokio::time::sleep(drain_grace);
    tokio::pin!(deadline);
    // `Drain` is written while the connection keeps being driven (HTTP/2
    // moves only while polled: a write waiting for window would otherwise
    // freeze every stream), within the grace period like everything else.
    let tell = write_message(&mut control_send, &Message::Drain);
    tokio::pin!(tell);
    let mut told = false;
    while !(told && streams.is_empty()) {
        tokio::select! {
            _ = &mut tell, if !told => told = true,
            incoming = carrier.accept() => match incoming {
                Ok(s) => {
                    let id = s.id();
                    spawn(&mut streams, s, id, true);
                }
                Err(_) => break,
            },
            Some(_) = streams.join_next(), if !streams.is_empty() => {}
            _ = &mut deadline => {
                if !streams.is_empty() {
                    tracing::warn!(active = streams.len(), "grace period over; resetting the remaining streams");
                    report(&policy, "reset: the grace period is over");
                }
                break;
            }
        }
    }
    streams.abort_all();
    carrier.close(close::AGENT_DRAINED, "agent drained").await;
    SessionEnd::Drained
}

/// Streams named one by one in a drain log; the rest are counted.
const REPORTED: usize = 16;

/// Logs the connection's open streams, oldest first: their targets, ages
/// and which directions are still open, so that a drain that waits says
/// on what.
fn report(policy: &DialPolicy, what: &str) {
    let open = policy.open.of_connection(policy.connection);
    for t in open.iter().take(REPORTED) {
        tracing::info!(stream = %t.stream, open_for = ?t.age(), state = %t.state(), "open stream: {what}");
    }
    if open.len() > REPORTED {
        tracing::info!(more = open.len() - REPORTED, "more open streams");
    }
}
