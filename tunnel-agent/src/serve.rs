//! Serving a registered connection, written once for both transports:
//! accept one stream per tunneled connection until the connection ends or
//! a drain is asked for; then send `Drain`, answer new dials `Draining`,
//! let open streams finish within the grace period, and close.

use std::collections::HashMap;
use std::sync::Arc;

use proto::codes::close;
use proto::Message;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::Instrument;
use transport::{read_message, write_message};

use crate::connection::{Incoming, ServerConnection};
use crate::dial::{oldest_first, serve_stream, StreamMode, StreamTrace};
use crate::error::{LostReason, SessionEnd};

/// Serves `conn` until it ends, or until `drain` turns true (then drains).
pub async fn serve(
    conn: ServerConnection,
    mut drain: watch::Receiver<bool>,
    server_draining: tokio::sync::oneshot::Sender<()>,
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
    let mut streams = Streams::default();
    let spawn = |streams: &mut Streams, incoming: Incoming, id: String, draining| {
        let trace = Arc::new(StreamTrace::new(id, policy.server));
        let mode = StreamMode {
            draining,
            stall: Some(window.clone()),
            trace: trace.clone(),
        };
        let span = tracing::debug_span!("stream", node = %policy.node, stream = %trace.stream);
        let policy = policy.clone();
        let task = match incoming {
            Incoming::Quic(send, recv) => streams
                .tasks
                .spawn(serve_stream(policy, send, recv, mode).instrument(span)),
            Incoming::H2(send, recv, _) => streams
                .tasks
                .spawn(serve_stream(policy, send, recv, mode).instrument(span)),
        };
        streams.traces.insert(task.id(), trace);
    };
    // After Welcome the server only says GoAway; an end or an error of the
    // control stream ends the session. Read in one future that lives
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
                    carrier.streams_open(streams.tasks.len());
                }
                Err(lost) => break Some(lost),
            },
            Some(done) = streams.tasks.join_next_with_id(), if !streams.tasks.is_empty() => {
                streams.ended(done);
            }
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
    while let Some(done) = streams.tasks.try_join_next_with_id() {
        streams.ended(done);
    }
    tracing::info!(active = streams.tasks.len(), grace = ?drain_grace, "draining");
    streams.report("waiting for it to end");
    let deadline = tokio::time::sleep(drain_grace);
    tokio::pin!(deadline);
    // `Drain` is written while the connection keeps being driven (HTTP/2
    // moves only while polled: a write waiting for window would otherwise
    // freeze every stream), within the grace period like everything else.
    let tell = write_message(&mut control_send, &Message::Drain);
    tokio::pin!(tell);
    let mut told = false;
    while !(told && streams.tasks.is_empty()) {
        tokio::select! {
            _ = &mut tell, if !told => told = true,
            incoming = carrier.accept() => match incoming {
                Ok(s) => {
                    let id = s.id();
                    spawn(&mut streams, s, id, true);
                }
                Err(_) => break,
            },
            Some(done) = streams.tasks.join_next_with_id(), if !streams.tasks.is_empty() => {
                streams.ended(done);
            }
            _ = &mut deadline => {
                if !streams.tasks.is_empty() {
                    tracing::warn!(active = streams.tasks.len(), "grace period over; resetting the remaining streams");
                    streams.report("reset: the grace period is over");
                }
                break;
            }
        }
    }
    streams.tasks.abort_all();
    carrier.close(close::AGENT_DRAINED, "agent drained").await;
    SessionEnd::Drained
}

/// The connection's stream tasks, and what each is doing.
#[derive(Default)]
struct Streams {
    tasks: JoinSet<()>,
    traces: HashMap<tokio::task::Id, Arc<StreamTrace>>,
}

/// Streams named one by one in a drain log; the rest are counted.
const REPORTED: usize = 16;

impl Streams {
    /// Forgets a task that ended (or panicked, or was aborted).
    fn ended(&mut self, done: Result<(tokio::task::Id, ()), tokio::task::JoinError>) {
        let id = match done {
            Ok((id, ())) => id,
            Err(e) => e.id(),
        };
        self.traces.remove(&id);
    }

    /// Logs the open streams, oldest first: their targets, ages and which
    /// directions are still open, so that a drain that waits says on what.
    fn report(&self, what: &str) {
        let open = oldest_first(self.traces.values().cloned());
        for t in open.iter().take(REPORTED) {
            tracing::info!(stream = %t.stream, open_for = ?t.age(), state = %t.state(), "open stream: {what}");
        }
        if open.len() > REPORTED {
            tracing::info!(more = open.len() - REPORTED, "more open streams");
        }
    }
}
