//! Looking at the topology from inside a namespace: curl, TCP connects,
//! and waiting for a condition with a deadline.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::{Ns, Proc};

/// Waits (up to 5 s) until something accepts connections on `addr` in `ns`.
pub fn listening(ns: &Ns, addr: SocketAddr) -> bool {
    ns.block_on(|| async move {
        for _ in 0..100 {
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    })
}

/// curl's output (`-sS`, 20 s at most) in `ns`.
pub fn curl(ns: &Ns, args: &[&str]) -> String {
    curl_with_errors(ns, args).0
}

/// curl's output and, when it failed, what it said on stderr.
pub fn curl_with_errors(ns: &Ns, args: &[&str]) -> (String, String) {
    let out = ns
        .command("curl")
        .args(["-sS", "--max-time", "20"])
        .args(args)
        .output()
        .unwrap();
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Whether `url` answers with a success status within 2 s, from `ns`.
pub fn curl_ok(ns: &Ns, url: &str) -> bool {
    ns.command("curl")
        .args(["-fsS", "--max-time", "2", "-o", "/dev/null", url])
        .status()
        .unwrap()
        .success()
}

/// Polls `cond` every 100 ms; panics with `proc_`'s log if it does not
/// hold within `within`.
pub fn wait_until(within: Duration, what: &str, mut cond: impl FnMut() -> bool, proc_: &Proc) {
    let deadline = Instant::now() + within;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "{what}: not within {within:?}; log:\n{}",
            proc_.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
