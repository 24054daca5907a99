//! Talking to iptables: back-end detection, atomic apply, cleanup, the
//! capability check, and the bounded command runner `conntrack` uses too.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::process::Command;

use super::rules::{self, Current, Family};

/// Bound on every iptables / conntrack invocation.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(20);

/// Linux capability number of CAP_NET_ADMIN.
const CAP_NET_ADMIN: u32 = 12;

#[derive(Debug, thiserror::Error)]
pub enum DnatError {
    #[error("the DNAT helper needs the CAP_NET_ADMIN capability to change iptables rules; run as root or grant NET_ADMIN (securityContext.capabilities.add: [NET_ADMIN])")]
    MissingCapability,
    #[error("no iptables found: install iptables (needs {0} or iptables-{{nft,legacy}}-restore on PATH)")]
    NoIptables(&'static str),
    #[error("{command} failed: {detail}")]
    Command { command: String, detail: String },
    #[error("{program} is not installed (not found on PATH)")]
    Missing { program: String },
    #[error("{command} did not finish within {COMMAND_TIMEOUT:?}")]
    Timeout { command: String },
    #[error(transparent)]
    Source(#[from] super::agent_list::AgentListError),
}

/// Which kernel interface the iptables tools drive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    NfTables,
    Legacy,
    /// Whatever plain `iptables-restore` is on this host.
    Default,
}

/// The iptables tools for one family and back end.
#[derive(Clone, Debug)]
pub struct Iptables {
    pub family: Family,
    pub backend: Backend,
    save: String,
    restore: String,
}

/// Whether this process holds CAP_NET_ADMIN (from /proc/self/status).
pub fn has_net_admin() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        })
        .is_some_and(|caps| caps & (1 << CAP_NET_ADMIN) != 0)
}

/// What a command that succeeded printed (each at most what
/// [`Capture`] and [`STDERR_KEPT`] keep).
pub(super) struct Output {
    pub stdout: String,
    pub stderr: String,
    /// Whether stdout was longer than what was kept.
    pub stdout_truncated: bool,
}

/// How much of a command's stdout to keep; the rest is read and dropped,
/// so the command never blocks on a full pipe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Capture {
    /// Keep up to this many bytes.
    Upto(usize),
    /// Keep none (`conntrack -D` prints every entry it deletes: a cut
    /// edge's 20,000 entries were 4 MB kept only to read a count from
    /// stderr, and a freed allocation that large raised glibc's mmap
    /// threshold, after which the server kept ~9 MiB it no longer used).
    Discard,
}

/// The most of `iptables-save`'s output kept: the nat table of a
/// kube-proxy with tens of thousands of rules is a few MB; past this the
/// rules cannot be read whole, and the command fails rather than act on
/// part of them.
const SAVE_KEPT: usize = 64 << 20;

/// The most of a command's stderr kept (its error message, conntrack's
/// count line).
const STDERR_KEPT: usize = 64 << 10;

async fn run(program: &str, args: &[&str], stdin: Option<&str>) -> Result<String, DnatError> {
    run_whole(program, args, stdin, SAVE_KEPT).await
}

/// What `program` printed, which must be at most `kept` bytes: rules read
/// in part could be acted on wrongly, so more is an error.
async fn run_whole(
    program: &str,
    args: &[&str],
    stdin: Option<&str>,
    kept: usize,
) -> Result<String, DnatError> {
    let out = run_output(program, args, stdin, Capture::Upto(kept)).await?;
    if out.stdout_truncated {
        return Err(DnatError::Command {
            command: format!("{program} {}", args.join(" ")),
            detail: format!("printed more than {kept} bytes"),
        });
    }
    Ok(out.stdout)
}

/// Reads `pipe` to its end, keeping at most `keep` bytes; whether there
/// was more.
async fn read_bounded<R: tokio::io::AsyncRead + Unpin>(
    pipe: Option<R>,
    keep: usize,
) -> std::io::Result<(Vec<u8>, bool)> {
    use tokio::io::AsyncReadExt;
    let Some(pipe) = pipe else {
        return Ok((Vec::new(), false));
    };
    let mut kept = Vec::new();
    let mut limited = pipe.take(keep as u64);
    limited.read_to_end(&mut kept).await?;
    let rest = tokio::io::copy(&mut limited.into_inner(), &mut tokio::io::sink()).await?;
    Ok((kept, rest > 0))
}

/// Runs `program` with `args` (and `stdin`), bounded by [`COMMAND_TIMEOUT`]
/// and in what it keeps of the output; a non-zero exit is an error
/// carrying its stderr.
pub(super) async fn run_output(
    program: &str,
    args: &[&str],
    stdin: Option<&str>,
    capture: Capture,
) -> Result<Output, DnatError> {
    let command = format!("{program} {}", args.join(" "));
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(match capture {
            Capture::Upto(_) => Stdio::piped(),
            Capture::Discard => Stdio::null(),
        })
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let work = async {
        let mut child = cmd.spawn().map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                DnatError::Missing {
                    program: program.to_owned(),
                }
            } else {
                DnatError::Command {
                    command: command.clone(),
                    detail: e.to_string(),
                }
            }
        })?;
        if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
            pipe.write_all(input.as_bytes())
                .await
                .map_err(|e| DnatError::Command {
                    command: command.clone(),
                    detail: format!("writing its input: {e}"),
                })?;
        }
        let keep = match capture {
            Capture::Upto(n) => n,
            Capture::Discard => 0,
        };
        let failed = |e: std::io::Error| DnatError::Command {
            command: command.clone(),
            detail: e.to_string(),
        };
        let (stdout, stderr, status) = tokio::try_join!(
            read_bounded(child.stdout.take(), keep),
            read_bounded(child.stderr.take(), STDERR_KEPT),
            child.wait(),
        )
        .map_err(failed)?;
        let ((stdout, stdout_truncated), (stderr, _)) = (stdout, stderr);
        if status.success() {
            Ok(Output {
                stdout: String::from_utf8_lossy(&stdout).into_owned(),
                stderr: String::from_utf8_lossy(&stderr).into_owned(),
                stdout_truncated,
            })
        } else {
            Err(DnatError::Command {
                command: command.clone(),
                detail: format!("{status}: {}", String::from_utf8_lossy(&stderr).trim()),
            })
        }
    };
    tokio::time::timeout(COMMAND_TIMEOUT, work)
        .await
        .map_err(|_| DnatError::Timeout {
            command: command.clone(),
        })?
}

fn count_rules(save: &str) -> usize {
    save.lines().filter(|l| l.starts_with("-A ")).count()
}

impl Iptables {
    /// Finds the tools for `family` and the back end this host uses: the
    /// one that already holds rules (kube-proxy's, Docker's...), nf_tables
    /// when neither does. Mixing back ends would leave our rules invisible
    /// to the other one.
    pub async fn detect(family: Family) -> Result<Iptables, DnatError> {
        let base = match family {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        };
        let mk = |backend, infix: &str| Iptables {
            family,
            backend,
            save: format!("{base}{infix}-save"),
            restore: format!("{base}{infix}-restore"),
        };
        let nft = mk(Backend::NfTables, "-nft");
        let legacy = mk(Backend::Legacy, "-legacy");
        let nft_rules = nft.save_all().await.ok().map(|s| count_rules(&s));
        let legacy_rules = legacy.save_all().await.ok().map(|s| count_rules(&s));
        let chosen = match (nft_rules, legacy_rules) {
            (Some(n), Some(l)) if l > n => legacy,
            (Some(_), _) => nft,
            (None, Some(_)) => legacy,
            (None, None) => {
                let plain = mk(Backend::Default, "");
                plain.save_all().await.map_err(|_| {
                    DnatError::NoIptables(if family == Family::V4 {
                        "iptables-restore"
                    } else {
                        "ip6tables-restore"
                    })
                })?;
                plain
            }
        };
        tracing::info!(backend = ?chosen.backend, tool = %chosen.restore, "iptables back end detected");
        Ok(chosen)
    }

    async fn save_all(&self) -> Result<String, DnatError> {
        run(&self.save, &[], None).await
    }

    /// Our chain, jumps and rules as they are now.
    pub async fn current(&self) -> Result<Current, DnatError> {
        Ok(rules::parse_save(
            &run(&self.save, &["-t", "nat"], None).await?,
        ))
    }

    /// Applies a restore script in one transaction, leaving other chains alone.
    pub async fn apply(&self, script: &str) -> Result<(), DnatError> {
        run(&self.restore, &["--noflush", "-w", "5"], Some(script))
            .await
            .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn rules_longer_than_the_bound_are_an_error_not_a_part() {
        // Through `sh -c`: no file of ours is executed.
        let args = ["-c", "head -c 5000 /dev/zero | tr '\\0' x"];
        let whole = run_whole("sh", &args, None, 5_000).await.unwrap();
        assert_eq!(whole.len(), 5_000);
        match run_whole("sh", &args, None, 4_999).await {
            Err(DnatError::Command { command, detail }) => {
                assert!(command.starts_with("sh -c"), "{command}");
                assert_eq!(detail, "printed more than 4999 bytes");
            }
            other => panic!("expected a command error, got {other:?}"),
        }
    }
}
