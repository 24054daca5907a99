//! The dial policy without a network: routing against a registry, and the
//! one deadline against fake streams on a paused clock.

use std::io;
use std::sync::Mutex;

use proto::DialResult;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use transport::testing::{Recv, Sink};

use super::*;

const TARGET: &str = "198.18.0.5:10250";
const TIMEOUT: Duration = Duration::from_secs(10);

/// A stream to a fake agent: what the server writes arrives on `agent.0`,
/// what is written to `agent.1` the server reads.
fn fake_stream(window: usize) -> (TunnelStream, (DuplexStream, DuplexStream)) {
    let (send, agent_reads) = tokio::io::duplex(window);
    let (recv, agent_writes) = tokio::io::duplex(window);
    (
        TunnelStream::new(Sink(send), Recv(recv)),
        (agent_reads, agent_writes),
    )
}

async fn answer(agent_writes: &mut DuplexStream, result: DialResult) {
    let mut frame = Vec::new();
    proto::encode(&Message::DialResult(result), &mut frame).unwrap();
    agent_writes.write_all(&frame).await.unwrap();
}

async fn read_dial(agent_reads: &mut DuplexStream) -> DialRequest {
    let mut buf = Vec::new();
    match read_message(agent_reads, &mut buf).await.unwrap() {
        Message::Dial(d) => d,
        other => panic!("expected Dial, got {}", other.kind()),
    }
}

fn target() -> SocketAddr {
    TARGET.parse().unwrap()
}

/// What the gate reported: its duration, or the failure's label.
type Report = Arc<Mutex<Option<Result<Duration, &'static str>>>>;

fn gate() -> (Answer, Report) {
    let seen: Report = Arc::new(Mutex::new(None));
    let s = seen.clone();
    let on_result: OnResult =
        Box::new(move |r| *s.lock().unwrap() = Some(r.map_err(|e| e.label())));
    (Answer::Gate(on_result), seen)
}

#[tokio::test(start_paused = true)]
async fn the_deadline_covers_an_open_that_never_completes() {
    for answer in [Answer::Read, gate().0] {
        let started = Instant::now();
        let open = std::future::pending();
        let e = exchange(open, "edge-1", target(), TIMEOUT, answer)
            .await
            .err()
            .expect("an open that never completes times out");
        assert!(
            matches!(e, DialError::Timeout { after, .. } if after == TIMEOUT + ROUND_TRIP_MARGIN)
        );
        assert_eq!(started.elapsed(), TIMEOUT + ROUND_TRIP_MARGIN);
        assert_eq!(e.label(), "timeout");
    }
}

#[tokio::test(start_paused = true)]
async fn the_deadline_covers_a_dial_write_that_never_completes() {
    // A one-byte window nobody reads: the agent gives no flow-control credit.
    let (stream, _agent) = fake_stream(1);
    let (answer, report) = gate();
    let e = exchange(async { Ok(stream) }, "edge-1", target(), TIMEOUT, answer)
        .await
        .err()
        .expect("a blocked Dial write times out");
    assert_eq!(e.label(), "timeout");
    // The procedure failed before the gate existed: the caller counts it.
    assert!(report.lock().unwrap().is_none());
}

#[tokio::test(start_paused = true)]
async fn awaiting_the_result_times_out_when_the_agent_is_silent() {
    let (stream, (mut agent_reads, _agent_writes)) = fake_stream(4096);
    let started = Instant::now();
    let dial = exchange(
        async { Ok(stream) },
        "edge-1",
        target(),
        TIMEOUT,
        Answer::Read,
    );
    let (result, request) = tokio::join!(dial, read_dial(&mut agent_reads));
    assert_eq!(request.target, target());
    assert_eq!(request.deadline_ms, 10_000);
    assert!(!request.optimistic, "a waited-for answer must not be held");
    assert_eq!(result.err().unwrap().label(), "timeout");
    assert_eq!(started.elapsed(), TIMEOUT + ROUND_TRIP_MARGIN);
}

#[tokio::test]
async fn a_refusal_is_typed() {
    let (stream, (mut agent_reads, mut agent_writes)) = fake_stream(4096);
    let agent = async {
        read_dial(&mut agent_reads).await;
        answer(
            &mut agent_writes,
            DialResult::error(DialCode::NotAllowed, "no"),
        )
        .await;
    };
    let dial = exchange(
        async { Ok(stream) },
        "edge-1",
        target(),
        TIMEOUT,
        Answer::Read,
    );
    let (result, ()) = tokio::join!(dial, agent);
    let e = result.err().unwrap();
    assert!(matches!(
        e,
        DialError::Refused {
            code: DialCode::NotAllowed,
            ..
        }
    ));
    assert_eq!(e.label(), "not_allowed");
}

#[tokio::test]
async fn an_ok_answer_leaves_the_stream_at_the_target_bytes() {
    let (stream, (mut agent_reads, mut agent_writes)) = fake_stream(4096);
    let agent = async {
        read_dial(&mut agent_reads).await;
        answer(&mut agent_writes, DialResult::ok()).await;
        agent_writes.write_all(b"hello").await.unwrap();
    };
    let dial = exchange(
        async { Ok(stream) },
        "edge-1",
        target(),
        TIMEOUT,
        Answer::Read,
    );
    let (result, ()) = tokio::join!(dial, agent);
    let mut stream = result.unwrap();
    let mut got = [0u8; 5];
    stream.recv.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"hello");
}

#[tokio::test(start_paused = true)]
async fn optimistic_returns_after_the_write_and_the_gate_keeps_the_deadline() {
    let (stream, (mut agent_reads, _agent_writes)) = fake_stream(4096);
    let started = Instant::now();
    let (answer, report) = gate();
    // The open takes 5 s of the 12 s: the gate gets the remaining 7 s.
    let open = async {
        tokio::time::sleep(Duration::from_secs(5)).await;
        Ok(stream)
    };
    let mut stream = exchange(open, "edge-1", target(), TIMEOUT, answer)
        .await
        .expect("returns without an answer");
    assert_eq!(started.elapsed(), Duration::from_secs(5));
    assert!(
        read_dial(&mut agent_reads).await.optimistic,
        "the agent may send the answer with the target's first bytes"
    );
    let e = stream.recv.read(&mut [0u8; 16]).await.unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::TimedOut);
    assert_eq!(started.elapsed(), TIMEOUT + ROUND_TRIP_MARGIN);
    assert_eq!(*report.lock().unwrap(), Some(Err("timeout")));
}

#[tokio::test]
async fn a_failed_open_is_open_failed() {
    let open = async { Err(OpenError::Quic(quinn::ConnectionError::LocallyClosed)) };
    let e = exchange(open, "edge-1", target(), TIMEOUT, Answer::Read)
        .await
        .err()
        .unwrap();
    assert!(matches!(e, DialError::Open { .. }));
    assert_eq!(e.label(), "open_failed");
}

async fn register(registry: &AgentRegistry, node: &str, addresses: &[&str]) -> Arc<AgentHandle> {
    let handle = crate::registry::testing::handle(1, node, addresses).await;
    registry.register(handle.clone()).unwrap();
    handle
}

#[test]
fn no_agent_fails_at_once() {
    let registry = AgentRegistry::default();
    let by_name = Target::Node {
        name: "edge-1".into(),
        port: 10250,
    };
    for target in [Target::Address(target()), by_name] {
        let e = route(&registry, &target).err().unwrap();
        assert!(matches!(e, DialError::NoAgent(_)), "{e}");
        assert_eq!(e.label(), "no_agent");
    }
}

#[tokio::test]
async fn routes_by_address_and_by_name() {
    let registry = AgentRegistry::default();
    register(&registry, "edge-1", &["198.18.0.5"]).await;
    // An IPv4-mapped IPv6 destination routes to the IPv4 address.
    let mapped = Target::Address("[::ffff:198.18.0.5]:10250".parse().unwrap());
    let (agent, addr) = route(&registry, &mapped).unwrap();
    assert_eq!((agent.node.as_str(), addr), ("edge-1", target()));
    let by_name = Target::Node {
        name: "edge-1".into(),
        port: 10250,
    };
    let (_, addr) = route(&registry, &by_name).unwrap();
    assert_eq!(addr, target());
}

#[tokio::test]
async fn a_draining_agent_is_not_routed() {
    let registry = AgentRegistry::default();
    let agent = register(&registry, "edge-1", &["198.18.0.5"]).await;
    agent
        .draining
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let e = route(&registry, &Target::Address(target())).err().unwrap();
    assert!(matches!(&e, DialError::Draining(node) if node == "edge-1"));
    assert_eq!(e.label(), "draining");
}

#[tokio::test]
async fn a_node_without_addresses_has_nothing_to_dial() {
    let registry = AgentRegistry::default();
    register(&registry, "edge-1", &[]).await;
    let by_name = Target::Node {
        name: "edge-1".into(),
        port: 10250,
    };
    let e = route(&registry, &by_name).err().unwrap();
    assert!(e.to_string().contains("carries no address"), "{e}");
}

fn shared() -> Arc<Shared> {
    let settings = crate::ServerSettings::new("127.0.0.1:0".parse().unwrap(), "/none".into());
    Arc::new(Shared::new(crate::ServerConfig::try_new(settings).unwrap()))
}

#[tokio::test]
async fn a_failed_dial_is_counted_once_in_either_mode() {
    let shared = shared();
    for mode in [DialMode::AwaitResult, DialMode::Optimistic] {
        let e = dial(&shared, &Target::Address(target()), mode).await.err();
        assert!(matches!(e, Some(DialError::NoAgent(_))));
    }
    let page = shared.render_metrics();
    assert!(
        page.contains("edge_tunnel_dial_failures_total{reason=\"no_agent\"} 2\n"),
        "{page}"
    );
    assert!(
        page.contains("edge_tunnel_dial_duration_seconds_count 0\n"),
        "{page}"
    );
}

#[tokio::test]
async fn a_node_at_its_stream_limit_fails_at_once_and_frees_slots() {
    let agent = crate::registry::testing::handle(1, "edge-1", &["198.18.1.2"]).await;
    let a = StreamSlot::take(&agent, 2).unwrap();
    let _b = StreamSlot::take(&agent, 2).unwrap();
    let e = StreamSlot::take(&agent, 2).unwrap_err();
    assert!(matches!(e, DialError::NodeBusy { limit: 2, .. }));
    assert_eq!(e.label(), "node_stream_limit");
    // A higher limit (the transparent path's reserve) still has room.
    let _c = StreamSlot::take(&agent, 3).unwrap();
    drop(a);
    assert!(StreamSlot::take(&agent, 3).is_ok());
    assert_eq!(agent.streams_active.load(Ordering::Relaxed), 2);
}
