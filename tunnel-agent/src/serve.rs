//! Serving a registered connection, written once for both transports:
//! accept one stream per tunneled connection until the connection ends or
//! a drain is asked for; then send `Drain`, answer new dials `Draining`,
//! let open streams finish within the grace period, and close.

use proto::codes::close;
use proto::Message;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::Instrument;
use transport::{read_message, write_message};

use crate::connection::{Incoming, ServerConnection};
use crate::dial::{serve_stream, StreamMode};
use crate::error::{LostReason, SessionEnd};

/// Serves `conn` until it ends, or until `drain` turns true (then drains).
pub async fn serve(conn: ServerConnection, mut drain: watch::Receiver<bool>) -> SessionEnd {
    let ServerConnection {
        mut carrier,
        mut control_send,
        mut control_recv,
        stall,
        policy,
        drain_grace,
        ..
    } = conn;
    let mut streams = JoinSet::new();
    let spawn = |streams: &mut JoinSet<()>, incoming: Incoming, id: String, draining| {
        let mode = StreamMode {
            draining,
            stall: Some(stall.clone()),
        };
        let span = tracing::debug_span!("stream", node = %policy.node, stream = %id);
        let policy = policy.clone();
        match incoming {
            Incoming::Quic(send, recv) => {
                streams.spawn(serve_stream(policy, send, recv, mode).instrument(span))
            }
            Incoming::H2(send, recv) => {
                streams.spawn(serve_stream(policy, send, recv, mode).instrument(span))
            }
        };
    };
    let mut control_buf = Vec::new();
    let lost = loop {
        tokio::select! {
            _ = async { drain.wait_for(|d| *d).await.map(|_| ()) } => break None,
            incoming = carrier.accept() => match incoming {
                Ok(s) => {
                    let id = s.id(&carrier);
                    spawn(&mut streams, s, id, false);
                }
                Err(lost) => break Some(lost),
            },
            Some(_) = streams.join_next(), if !streams.is_empty() => {}
            // After Welcome the server only says GoAway; an end or an error
            // of the control stream ends the session.
            msg = read_message(&mut control_recv, &mut control_buf) => match msg {
                Ok(Message::GoAway(g)) => break Some(LostReason::GoAway(g)),
                Ok(m) => tracing::debug!("ignoring {} on the control stream", m.kind()),
                Err(e) => break Some(carrier.lost_reason().unwrap_or_else(|| {
                    LostReason::Failed(format!("control stream ended: {e}"))
                })),
            },
        }
    };
    if let Some(lost) = lost {
        return SessionEnd::Lost(lost);
    }

    tracing::info!(active = streams.len(), grace = ?drain_grace, "draining");
    let deadline = tokio::time::sleep(drain_grace);
    tokio::pin!(deadline);
    // Bounded by the grace period like everything else in the drain.
    tokio::select! {
        _ = write_message(&mut control_send, &Message::Drain) => {}
        _ = &mut deadline => {}
    }
    while !streams.is_empty() {
        tokio::select! {
            incoming = carrier.accept() => match incoming {
                Ok(s) => {
                    let id = s.id(&carrier);
                    spawn(&mut streams, s, id, true);
                }
                Err(_) => break,
            },
            _ = streams.join_next() => {}
            _ = &mut deadline => {
                tracing::warn!(active = streams.len(), "grace period over; resetting the remaining streams");
                break;
            }
        }
    }
    streams.abort_all();
    carrier.close(close::AGENT_DRAINED, "agent drained").await;
    SessionEnd::Drained
}
