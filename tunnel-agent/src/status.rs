//! The status file (`--status-file`) and its check (`tunnel-agent
//! check-status`): the agent's liveness and readiness for probes that must
//! reach this process and no other.
//!
//! The agent runs on the host network, so its admin address is the node's.
//! During a rolling update with surge two agent pods run on one node, and
//! an HTTP probe of the new pod reaches whichever process holds that
//! address: the old one, until it exits. A new release that never
//! registers would then pass its readiness probe, and the DaemonSet would
//! go on to the next nodes. The status file lives in the pod's own
//! `emptyDir`; the agent rewrites it every [`INTERVAL`], and an exec probe
//! in the same container checks it (fresh: the agent's runtime is alive;
//! `ready`: every server replica the servers say exist is registered, or
//! at least one has been for [`PARTIAL_READY_AFTER`]).
//!
//! Ready means every replica, not one: behind a load balancer the further
//! replicas are reached only after the first `Welcome` says how many exist,
//! and a rolling update deletes the old agent once the new one is ready;
//! the old one's `Drain` would leave the replicas the new one has not
//! reached yet without a route to the node. A replica that cannot be
//! reached at all must not stall the rollout for good, hence the bound.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::replicas::HeldReplicas;

/// How often the agent rewrites the file.
pub const INTERVAL: Duration = Duration::from_secs(2);

/// How long the agent waits, once it holds a replica, for the rest of the
/// replicas the servers say exist before it says ready anyway.
pub const PARTIAL_READY_AFTER: Duration = Duration::from_secs(60);

/// Whether an agent holding `held` of `expected` replicas (0: no server
/// has said yet; at most the `--max-replicas` it holds), the first of them
/// for `held_for`, is ready.
pub fn is_ready(held: usize, expected: u16, held_for: Duration) -> bool {
    held > 0 && (held >= usize::from(expected) || held_for >= PARTIAL_READY_AFTER)
}

/// What the file says: one line, `ready HELD EXPECTED UNIX_SECONDS` or
/// `not-ready HELD EXPECTED UNIX_SECONDS`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Status {
    pub ready: bool,
    pub held: usize,
    pub expected: u16,
    /// When it was written (Unix seconds).
    pub written: u64,
}

impl Status {
    /// The status now; `held_for`: how long at least one replica has been
    /// held without a break; `max_replicas`: the most the agent holds
    /// (`--max-replicas`), whatever the servers say.
    pub fn now(held: &HeldReplicas, held_for: Duration, max_replicas: u16) -> Status {
        let n = held.len();
        let expected = held.expected();
        Status {
            ready: is_ready(n, expected.min(max_replicas), held_for),
            held: n,
            expected,
            written: unix_now(),
        }
    }

    fn line(&self) -> String {
        let word = if self.ready { "ready" } else { "not-ready" };
        format!("{word} {} {} {}\n", self.held, self.expected, self.written)
    }

    fn parse(text: &str) -> Result<Status, String> {
        let bad = || format!("not a status line: {:?}", text.trim_end());
        let mut words = text.split_whitespace();
        let ready = match words.next() {
            Some("ready") => true,
            Some("not-ready") => false,
            _ => return Err(bad()),
        };
        let mut number = || words.next().and_then(|w| w.parse::<u64>().ok());
        let (Some(held), Some(expected), Some(written)) = (number(), number(), number()) else {
            return Err(bad());
        };
        Ok(Status {
            ready,
            held: usize::try_from(held).map_err(|_| bad())?,
            expected: u16::try_from(expected).map_err(|_| bad())?,
            written,
        })
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Replaces the file's content in one step (a probe never reads half a
/// line): written beside it, then renamed over it.
pub fn write(path: &Path, status: &Status) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(status.line().as_bytes())?;
    std::fs::rename(&tmp, path)
}

/// Rewrites the file every [`INTERVAL`] until the task is dropped; a
/// failed write is logged (once a minute at most) and tried again.
pub async fn keep_writing(path: PathBuf, held: HeldReplicas, max_replicas: u16) {
    let mut tick = tokio::time::interval(INTERVAL);
    let mut warned: Option<tokio::time::Instant> = None;
    let mut held_since: Option<tokio::time::Instant> = None;
    loop {
        tick.tick().await;
        held_since = match (held.len(), held_since) {
            (0, _) => None,
            (_, None) => Some(tokio::time::Instant::now()),
            (_, since) => since,
        };
        let held_for = held_since.map_or(Duration::ZERO, |t| t.elapsed());
        let status = Status::now(&held, held_for, max_replicas);
        let path2 = path.clone();
        let written = tokio::task::spawn_blocking(move || write(&path2, &status))
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e)));
        if let Err(e) = written {
            if warned.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) {
                tracing::warn!(file = %path.display(), "cannot write the status file: {e}");
                warned = Some(tokio::time::Instant::now());
            }
        }
    }
}

/// `tunnel-agent check-status FILE [--ready] [--max-age DURATION]`: exit
/// 0 if the file was written within the age (default 30 s) and, with
/// `--ready`, says ready; otherwise says why, exit 1. For exec probes.
pub fn check(path: &Path, want_ready: bool, max_age: Duration) -> Result<String, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let status = Status::parse(&text)?;
    let age = unix_now().saturating_sub(status.written);
    if age > max_age.as_secs() {
        return Err(format!(
            "stale: written {age} s ago (at most {} s): the agent is not running, or hangs",
            max_age.as_secs()
        ));
    }
    let of = match status.expected {
        0 => String::new(),
        e => format!(" of {e}"),
    };
    let why = match status.held {
        0 => "no server replica registered".to_owned(),
        n => format!(
            "{n}{of} replica(s) held; waiting up to {} s for the rest",
            PARTIAL_READY_AFTER.as_secs()
        ),
    };
    match (want_ready, status.ready) {
        (true, false) => Err(format!("not ready: {why}")),
        (_, true) => Ok(format!("ready: {}{of} replica(s) held", status.held)),
        (false, false) => Ok(format!("alive, not ready: {why}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(ready: bool, written: u64) -> Status {
        Status {
            ready,
            held: usize::from(ready),
            expected: 2,
            written,
        }
    }

    #[test]
    fn a_fresh_ready_file_passes_and_anything_else_says_why() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("status");
        let age = Duration::from_secs(30);
        let e = check(&path, true, age).unwrap_err();
        assert!(e.contains("cannot read"), "{e}");

        write(&path, &status(true, unix_now())).unwrap();
        assert_eq!(
            check(&path, true, age).unwrap(),
            "ready: 1 of 2 replica(s) held"
        );

        write(&path, &status(false, unix_now())).unwrap();
        assert!(check(&path, false, age).is_ok(), "alive is enough");
        let e = check(&path, true, age).unwrap_err();
        assert!(e.starts_with("not ready"), "{e}");

        write(&path, &status(true, unix_now() - 100)).unwrap();
        let e = check(&path, false, age).unwrap_err();
        assert!(e.starts_with("stale: written 100 s ago"), "{e}");

        std::fs::write(&path, "ready\n").unwrap();
        let e = check(&path, true, age).unwrap_err();
        assert!(e.contains("not a status line"), "{e}");
        std::fs::write(&path, "ready 1 99999 7\n").unwrap();
        assert!(check(&path, false, age)
            .unwrap_err()
            .contains("not a status line"));
    }

    #[test]
    fn ready_is_every_replica_or_one_for_a_minute() {
        let now = Duration::ZERO;
        assert!(!is_ready(0, 0, now), "nothing held");
        assert!(!is_ready(0, 3, PARTIAL_READY_AFTER));
        assert!(is_ready(1, 0, now), "no server said how many");
        assert!(is_ready(1, 1, now));
        assert!(!is_ready(1, 3, now), "behind a balancer, 2 to go");
        assert!(!is_ready(2, 3, Duration::from_secs(59)));
        assert!(is_ready(3, 3, now));
        assert!(is_ready(4, 3, now), "more held than said (a stale count)");
        assert!(
            is_ready(1, 3, PARTIAL_READY_AFTER),
            "one unreachable replica does not stall a rollout for good"
        );
        let partial = Status {
            ready: false,
            held: 1,
            expected: 3,
            written: unix_now(),
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("status");
        write(&path, &partial).unwrap();
        let e = check(&path, true, Duration::from_secs(30)).unwrap_err();
        assert_eq!(
            e,
            "not ready: 1 of 3 replica(s) held; waiting up to 60 s for the rest"
        );
    }

    #[test]
    fn an_agent_holding_its_max_replicas_is_ready() {
        use crate::selector::Transport;
        let held = HeldReplicas::default();
        let addr = |p| (std::net::SocketAddr::from(([127, 0, 0, 1], p)), 0);
        let _a = held.hold(addr(1), "r1", Transport::Quic, 3).unwrap();
        let _b = held.hold(addr(2), "r2", Transport::Quic, 3).unwrap();
        assert!(!Status::now(&held, Duration::ZERO, 16).ready, "2 of 3");
        assert!(
            Status::now(&held, Duration::ZERO, 2).ready,
            "--max-replicas 2"
        );
        assert_eq!(Status::now(&held, Duration::ZERO, 2).expected, 3);
    }

    #[test]
    fn the_line_reads_back() {
        let s = status(false, 1_700_000_000);
        assert_eq!(Status::parse(&s.line()).unwrap(), s);
    }
}
