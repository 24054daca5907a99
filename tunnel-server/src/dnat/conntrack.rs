//! Deleting the conntrack entries that disagree with the DNAT rules, with
//! the `conntrack` tool (conntrack-tools).
//!
//! NAT is decided on a connection's first packet and kept in its conntrack
//! entry: when a redirect is removed (an agent left, a `--dnat-cidr` was
//! dropped across a restart, the target moved), the entries it made keep
//! steering their flows (and a SYN's retries) to the old target until they
//! end or time out; when a redirect appears, an entry made without it (a
//! SYN retried before the rule existed) keeps bypassing it. [`Conntrack`]
//! deletes exactly those entries and never one the current rules made.
//!
//! Why the CLI and not netlink from Rust: conntrack-tools is the
//! maintained reference client of ctnetlink, ships next to iptables in the
//! DNAT image and in CI, and its filters (original destination with a
//! CIDR mask, port, reply source) are what we need, applied in the
//! kernel. Of the Rust crates, `conntrack` only dumps,
//! `netlink-packet-netfilter` has no conntrack messages (only a fork
//! does) and `nlink` deletes by tuple or id, so ranges would still mean
//! dump, filter and delete in our code, on a privileged path. A flush runs
//! only when the rules change, so a process per destination is cheap.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};

use super::iptables::{run_output, Capture, DnatError};
use super::metrics::DnatMetrics;
use super::rules::{Prefix, Stale, StaleKind};

/// Most untranslated entries of one range deleted one by one per flush
/// (a range's untranslated entries can only be listed and deleted singly).
pub const MAX_RANGE_ENTRIES: usize = 4096;

/// The most of a range's `conntrack -L` listing read: ~200 bytes an
/// entry, so several times [`MAX_RANGE_ENTRIES`] even when most of the
/// range's entries are translated ones, which are skipped.
const LISTING_KEPT: usize = 8 << 20;

/// What one flush did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flushed {
    /// This many entries were deleted.
    Deleted(u64),
    /// Nothing matched.
    None,
    /// `conntrack` failed (the reason is logged).
    Failed,
    /// `conntrack` is not installed (warned once).
    Unavailable,
}

/// Runs conntrack flushes and counts them.
#[derive(Debug)]
pub struct Conntrack {
    program: String,
    /// The most of a range's listing read ([`LISTING_KEPT`]).
    listing_kept: usize,
    metrics: DnatMetrics,
    warned_missing: AtomicBool,
}

/// One connection as `conntrack -L` prints it, both directions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub orig_src: IpAddr,
    pub orig_dst: IpAddr,
    pub sport: u16,
    pub dport: u16,
    pub reply_src: IpAddr,
}

/// Parses `conntrack -L` output (the default text format): per line, the
/// first `src= dst= sport= dport=` are the original direction, the next
/// `src=` the reply source. Lines that do not parse are skipped.
pub fn parse_entries(listing: &str) -> Vec<Entry> {
    listing
        .lines()
        .filter_map(|line| {
            let mut srcs = Vec::new();
            let (mut dst, mut sport, mut dport) = (None, None, None);
            for word in line.split_whitespace() {
                if let Some(v) = word.strip_prefix("src=") {
                    srcs.push(v.parse::<IpAddr>().ok()?);
                } else if let Some(v) = word.strip_prefix("dst=") {
                    dst = dst.or(v.parse::<IpAddr>().ok());
                } else if let Some(v) = word.strip_prefix("sport=") {
                    sport = sport.or(v.parse::<u16>().ok());
                } else if let Some(v) = word.strip_prefix("dport=") {
                    dport = dport.or(v.parse::<u16>().ok());
                }
            }
            Some(Entry {
                orig_src: *srcs.first()?,
                orig_dst: dst?,
                sport: sport?,
                dport: dport?,
                reply_src: *srcs.get(1)?,
            })
        })
        .collect()
}

/// The count in conntrack's "N flow entries have been deleted." line.
pub fn deleted_count(stderr: &str) -> Option<u64> {
    let words: Vec<&str> = stderr.split_whitespace().collect();
    words
        .windows(3)
        .find(|w| w[1] == "flow" && w[2] == "entries")
        .and_then(|w| w[0].parse().ok())
}

fn family(dst: &Prefix) -> &'static str {
    if dst.ip.is_ipv4() {
        "ipv4"
    } else {
        "ipv6"
    }
}

/// `ADDR` for a single address, `ADDR/LEN` for a range (conntrack ≥ 1.4.5
/// reads CIDR notation as a mask).
fn dst_arg(dst: &Prefix) -> String {
    let host = if dst.ip.is_ipv4() { 32 } else { 128 };
    if dst.len == host {
        dst.ip.to_string()
    } else {
        dst.to_string()
    }
}

impl Conntrack {
    pub fn new(metrics: DnatMetrics) -> Conntrack {
        Conntrack::with_program("conntrack", metrics)
    }

    /// With another program than `conntrack` on PATH (tests).
    pub fn with_program(program: &str, metrics: DnatMetrics) -> Conntrack {
        Conntrack {
            program: program.to_owned(),
            listing_kept: LISTING_KEPT,
            metrics,
            warned_missing: AtomicBool::new(false),
        }
    }

    /// Deletes the entries `stale` describes; best effort, counted in
    /// `dnat_conntrack_flushes` and logged, never an error.
    pub async fn flush(&self, stale: &Stale) -> Flushed {
        let result = match stale.kind {
            StaleKind::NatedTo(target) => self.delete(stale, &target.to_string()).await,
            StaleKind::NotNated if stale.dst.len == host_len(&stale.dst) => {
                self.delete(stale, &stale.dst.ip.to_string()).await
            }
            StaleKind::NotNated => self.delete_untranslated_in_range(stale).await,
        };
        let flushed = match result {
            Ok(0) => Flushed::None,
            Ok(n) => Flushed::Deleted(n),
            Err(DnatError::Missing { .. }) => {
                if !self.warned_missing.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        program = %self.program,
                        "conntrack is not installed: after a DNAT change, connections tracked \
                         before it keep their old translation until they end or time out; \
                         install conntrack-tools (this warning is given once)"
                    );
                }
                Flushed::Unavailable
            }
            Err(e) => {
                tracing::warn!(dst = %stale.dst, port = stale.port, "conntrack flush failed: {e}");
                Flushed::Failed
            }
        };
        match flushed {
            Flushed::Deleted(n) => {
                self.metrics.conntrack_flush("deleted");
                self.metrics.conntrack_entries_deleted.inc_by(n);
                tracing::info!(dst = %stale.dst, port = stale.port, kind = ?stale.kind, entries = n, "stale conntrack entries deleted");
            }
            Flushed::None => self.metrics.conntrack_flush("none"),
            Flushed::Failed => self.metrics.conntrack_flush("failed"),
            Flushed::Unavailable => self.metrics.conntrack_flush("unavailable"),
        }
        flushed
    }

    /// `conntrack -D` of TCP entries to `stale.dst` (an address or a range)
    /// and port whose reply source is `reply_src`; the number deleted.
    async fn delete(&self, stale: &Stale, reply_src: &str) -> Result<u64, DnatError> {
        let dst = dst_arg(&stale.dst);
        let port = stale.port.to_string();
        let args = [
            "-D",
            "-f",
            family(&stale.dst),
            "-p",
            "tcp",
            "--orig-dst",
            &dst,
            "--dport",
            &port,
            "--reply-src",
            reply_src,
        ];
        self.run_delete(&args).await
    }

    async fn run_delete(&self, args: &[&str]) -> Result<u64, DnatError> {
        // `-D` prints each entry it deletes: only stderr's count is read.
        match run_output(&self.program, args, None, Capture::Discard).await {
            Ok(out) => Ok(deleted_count(&out.stderr).unwrap_or(0)),
            // Exit status 1 with "0 flow entries" just means there were none.
            Err(DnatError::Command { detail, .. }) if deleted_count(&detail) == Some(0) => Ok(0),
            Err(e) => Err(e),
        }
    }

    /// The untranslated entries of a range: conntrack cannot filter on
    /// "reply source = original destination", so list the range's entries
    /// and delete those one by one (at most [`MAX_RANGE_ENTRIES`]).
    async fn delete_untranslated_in_range(&self, stale: &Stale) -> Result<u64, DnatError> {
        let dst = dst_arg(&stale.dst);
        let port = stale.port.to_string();
        let fam = family(&stale.dst);
        let listing = run_output(
            &self.program,
            &[
                "-L",
                "-f",
                fam,
                "-p",
                "tcp",
                "--orig-dst",
                &dst,
                "--dport",
                &port,
            ],
            None,
            Capture::Upto(self.listing_kept),
        )
        .await?;
        let mut text = listing.stdout.as_str();
        if listing.stdout_truncated {
            tracing::warn!(dst = %stale.dst, port = stale.port, "the conntrack listing of the range is longer than {} bytes: reading its first part only", self.listing_kept);
            // The last line kept may be cut anywhere (a reply address
            // cut short is another address): whole lines only.
            text = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
        }
        let untranslated: Vec<Entry> = parse_entries(text)
            .into_iter()
            .filter(|e| e.reply_src == e.orig_dst && stale.dst.contains(e.orig_dst))
            .collect();
        if untranslated.len() > MAX_RANGE_ENTRIES {
            tracing::warn!(dst = %stale.dst, port = stale.port, found = untranslated.len(), "more untranslated conntrack entries than {MAX_RANGE_ENTRIES}: deleting the first ones only");
        }
        let mut deleted = 0;
        for e in untranslated.iter().take(MAX_RANGE_ENTRIES) {
            let (src, dst, sport, dport) = (
                e.orig_src.to_string(),
                e.orig_dst.to_string(),
                e.sport.to_string(),
                e.dport.to_string(),
            );
            deleted += self
                .run_delete(&[
                    "-D",
                    "-f",
                    fam,
                    "-p",
                    "tcp",
                    "--orig-src",
                    &src,
                    "--orig-dst",
                    &dst,
                    "--sport",
                    &sport,
                    "--dport",
                    &dport,
                    "--reply-src",
                    &dst,
                ])
                .await?;
        }
        Ok(deleted)
    }
}

fn host_len(p: &Prefix) -> u8 {
    if p.ip.is_ipv4() {
        32
    } else {
        128
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listing_lines_parse_into_both_directions() {
        let out = "\
tcp      6 119 SYN_SENT src=198.18.0.1 dst=10.20.3.4 sport=40000 dport=10250 [UNREPLIED] src=10.20.3.4 dst=198.18.0.1 sport=10250 dport=40000 mark=0 use=1
tcp      6 431999 ESTABLISHED src=198.18.0.1 dst=10.20.3.5 sport=40002 dport=10250 src=198.18.0.1 dst=198.18.0.1 sport=8081 dport=40002 [ASSURED] mark=0 use=1
tcp      6 10 CLOSE src=fd00::1 dst=fd00:20::5 sport=1 dport=10250 src=fd00:20::5 dst=fd00::1 sport=10250 dport=1 mark=0 use=1
garbage
";
        let e = parse_entries(out);
        assert_eq!(e.len(), 3);
        assert_eq!(
            e[0],
            Entry {
                orig_src: "198.18.0.1".parse().unwrap(),
                orig_dst: "10.20.3.4".parse().unwrap(),
                sport: 40000,
                dport: 10250,
                reply_src: "10.20.3.4".parse().unwrap(),
            }
        );
        // NATed: the reply comes from the transparent ingress.
        assert_eq!(e[1].reply_src, "198.18.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(e[2].orig_dst, "fd00:20::5".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn the_deleted_count_is_read_from_the_summary() {
        assert_eq!(
            deleted_count(
                "conntrack v1.4.7 (conntrack-tools): 3 flow entries have been deleted.\n"
            ),
            Some(3)
        );
        assert_eq!(
            deleted_count("exit status: 1: conntrack v1.4.7 (conntrack-tools): 0 flow entries have been deleted."),
            Some(0)
        );
        assert_eq!(deleted_count("conntrack: invalid parameter"), None);
    }

    #[test]
    fn destinations_are_spelled_as_conntrack_takes_them() {
        assert_eq!(dst_arg(&"198.18.1.2/32".parse().unwrap()), "198.18.1.2");
        assert_eq!(dst_arg(&"10.20.0.0/16".parse().unwrap()), "10.20.0.0/16");
        assert_eq!(dst_arg(&"fd00::5/128".parse().unwrap()), "fd00::5");
        assert_eq!(family(&"fd00::/64".parse().unwrap()), "ipv6");
    }

    #[tokio::test]
    async fn a_missing_conntrack_is_counted_not_fatal() {
        let metrics = DnatMetrics::default();
        let ct = Conntrack::with_program("conntrack-that-is-not-installed", metrics.clone());
        let stale = Stale {
            dst: "198.18.1.2/32".parse().unwrap(),
            port: 10250,
            kind: StaleKind::NotNated,
        };
        assert_eq!(ct.flush(&stale).await, Flushed::Unavailable);
        assert_eq!(ct.flush(&stale).await, Flushed::Unavailable);
        assert!(ct.warned_missing.load(Ordering::Relaxed));
        assert_eq!(
            metrics
                .conntrack_flushes
                .get_or_create(&[("result", "unavailable")])
                .get(),
            2
        );
    }

    /// A stand-in for `conntrack` that prints `stdout_bytes` of entries,
    /// then conntrack's count line on stderr.
    fn fake_conntrack(dir: &tempfile::TempDir, stdout_bytes: usize) -> String {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.path().join("conntrack");
        std::fs::write(
            &path,
            format!(
                "#!/bin/sh\nhead -c {stdout_bytes} /dev/zero | tr '\\0' x\n\
                 echo 'conntrack v1.4.8 (conntrack-tools): 20652 flow entries have been deleted.' >&2\n"
            ),
        )
        .unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path.to_str().unwrap().to_owned()
    }

    #[tokio::test]
    async fn a_delete_reads_the_count_not_the_entries() {
        let dir = tempfile::tempdir().unwrap();
        let program = fake_conntrack(&dir, 4 << 20);
        let metrics = DnatMetrics::default();
        let ct = Conntrack::with_program(&program, metrics.clone());
        let stale = Stale {
            dst: "198.18.1.2/32".parse().unwrap(),
            port: 7000,
            kind: StaleKind::NatedTo("198.18.0.1".parse().unwrap()),
        };
        // A script just written can meet ETXTBSY if another test forked
        // while its file was open for writing (the child holds the
        // descriptor until its own exec): try again then.
        let mut flushed = ct.flush(&stale).await;
        for _ in 0..5 {
            if flushed != Flushed::Failed {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            flushed = ct.flush(&stale).await;
        }
        assert_eq!(flushed, Flushed::Deleted(20652));
        assert_eq!(metrics.conntrack_entries_deleted.get(), 20652);
    }

    #[tokio::test]
    async fn a_command_s_output_is_kept_up_to_its_bound() {
        // Through `sh -c`: no file of ours is executed.
        let script = "head -c 100000 /dev/zero | tr '\\0' x; \
                      echo 'conntrack v1.4.8 (conntrack-tools): 20652 flow entries have been deleted.' >&2";
        let args = ["-c", script];
        let run = |capture| run_output("sh", &args, None, capture);
        let out = run(Capture::Upto(1_000)).await.unwrap();
        assert_eq!(out.stdout.len(), 1_000);
        assert!(out.stdout_truncated);
        assert_eq!(deleted_count(&out.stderr), Some(20652));
        let out = run(Capture::Upto(100_000)).await.unwrap();
        assert_eq!(out.stdout.len(), 100_000);
        assert!(!out.stdout_truncated);
        let out = run(Capture::Discard).await.unwrap();
        assert!(out.stdout.is_empty() && !out.stdout_truncated);
        assert_eq!(deleted_count(&out.stderr), Some(20652));
    }

    #[tokio::test]
    async fn a_listing_cut_short_is_read_to_its_last_whole_line() {
        use std::os::unix::fs::PermissionsExt;
        let line = |i: u32| {
            format!(
                "tcp      6 119 SYN_SENT src=198.18.0.1 dst=198.18.1.2 sport={} dport=7000 \
                 [UNREPLIED] src=198.18.1.2 dst=198.18.0.1 sport=7000 dport={} mark=0 use=1\n",
                40000 + i,
                40000 + i
            )
        };
        let listing: String = (0..50).map(line).collect();
        // Cut the listing in the 8th line just after its reply address,
        // where it would still parse as a whole entry.
        let eighth = line(7);
        let cut = 7 * eighth.len() + eighth.find(" dst=198.18.0.1").unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("listing"), &listing).unwrap();
        let deleted = dir.path().join("deleted");
        let path = dir.path().join("conntrack");
        std::fs::write(
            &path,
            format!(
                "#!/bin/sh\nif [ \"$1\" = -L ]; then cat {}; exit 0; fi\n\
                 echo \"$@\" >> {}\n\
                 echo 'conntrack v1.4.8 (conntrack-tools): 1 flow entries have been deleted.' >&2\n",
                dir.path().join("listing").display(),
                deleted.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        let mut ct = Conntrack::with_program(path.to_str().unwrap(), DnatMetrics::default());
        ct.listing_kept = cut;
        let stale = Stale {
            dst: "198.18.1.0/24".parse().unwrap(),
            port: 7000,
            kind: StaleKind::NotNated,
        };
        // A script just written can meet ETXTBSY (see above): try again.
        let mut flushed = ct.flush(&stale).await;
        for _ in 0..5 {
            if flushed != Flushed::Failed {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            let _ = std::fs::remove_file(&deleted);
            flushed = ct.flush(&stale).await;
        }
        assert_eq!(flushed, Flushed::Deleted(7));
        let deletes = std::fs::read_to_string(&deleted).unwrap();
        assert_eq!(deletes.lines().count(), 7, "{deletes}");
        assert!(deletes.contains("--sport 40006 "), "{deletes}");
        assert!(!deletes.contains("--sport 40007 "), "{deletes}");
    }
}
