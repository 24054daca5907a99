//! Kernel socket memory of each measured process.
//!
//! RSS leaves out what a process's sockets hold in the kernel: data a
//! relay has not read yet, data it wrote that is not acknowledged. A
//! tunnel that leaves its in-flight data there looks smaller by RSS than
//! one that holds it in user space, though the node pays for both, and a
//! pod's memory cgroup (cgroup v2) counts both against its limit.
//!
//! Every tunnel process of the run (ours and the peers') therefore starts
//! in a memory cgroup of its own, a child of the runner's, with the cgroup
//! v1 controller's socket accounting switched on (`memory.kmem.tcp.*`; it
//! counts every socket that uses the kernel's protocol memory accounting,
//! TCP and UDP alike), and the report gives its peak next to the peak RSS.
//! A process is moved in by the `sh` that execs `ip netns exec` for it,
//! so every socket it ever opens is counted. Without the v1 memory controller (a cgroup v2
//! host, whose `memory.stat` has the current `sock` bytes but no peak)
//! processes start as before and the report says "not measured".

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

use e2e::netns::{Ns, Proc};

const V1_MEMORY: &str = "/sys/fs/cgroup/memory";
const TCP_LIMIT: &str = "memory.kmem.tcp.limit_in_bytes";
const TCP_PEAK: &str = "memory.kmem.tcp.max_usage_in_bytes";

struct Accounting {
    /// This run's parent cgroup, under the runner's own memory cgroup.
    dir: PathBuf,
    next: AtomicUsize,
    by_pid: Mutex<HashMap<u32, PathBuf>>,
}

static ACCOUNTING: OnceLock<Option<Accounting>> = OnceLock::new();

fn accounting() -> Option<&'static Accounting> {
    ACCOUNTING
        .get_or_init(|| match setup() {
            Ok(a) => Some(a),
            Err(why) => {
                eprintln!("kernel socket memory is not measured: {why}");
                None
            }
        })
        .as_ref()
}

fn setup() -> Result<Accounting, String> {
    let own = std::fs::read_to_string("/proc/self/cgroup")
        .map_err(|e| format!("/proc/self/cgroup: {e}"))?;
    let path = v1_memory_path(&own).ok_or("no cgroup v1 memory controller (a cgroup v2 host)")?;
    let parent = Path::new(V1_MEMORY).join(path.trim_start_matches('/'));
    if !parent.join(TCP_LIMIT).exists() {
        return Err(format!(
            "{} has no {TCP_LIMIT} (socket accounting)",
            parent.display()
        ));
    }
    remove_stale(&parent);
    let dir = parent.join(format!("edge-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    Ok(Accounting {
        dir,
        next: AtomicUsize::new(0),
        by_pid: Mutex::new(HashMap::new()),
    })
}

/// The v1 memory cgroup in a `/proc/PID/cgroup` text: its lines read
/// `ID:controllers:/path`, and the memory controller may share its line
/// with others (`7:memory,blkio:/x`); a v2 host has only `0::/path`.
fn v1_memory_path(proc_cgroup: &str) -> Option<&str> {
    proc_cgroup.lines().find_map(|l| {
        let mut f = l.splitn(3, ':');
        let (_, controllers, path) = (f.next()?, f.next()?, f.next()?);
        controllers
            .split(',')
            .any(|c| c == "memory")
            .then_some(path)
    })
}

/// Removes what an earlier run that did not finish left behind (a cgroup
/// still holding a process is kept).
fn remove_stale(parent: &Path) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for run in entries.flatten() {
        if run.file_name().to_string_lossy().starts_with("edge-bench-") {
            remove_run(&run.path());
        }
    }
}

fn remove_run(dir: &Path) {
    if let Ok(children) = std::fs::read_dir(dir) {
        for child in children.flatten() {
            if child.path().is_dir() {
                let _ = std::fs::remove_dir(child.path());
            }
        }
    }
    let _ = std::fs::remove_dir(dir);
}

/// Starts `program` in `ns` as [`Ns::spawn`] does, in a fresh memory
/// cgroup whose socket accounting is on (when the host has one).
pub fn spawn(ns: &Ns, program: &str, args: &[&str], log: &Path) -> Proc {
    let Some(acc) = accounting() else {
        return ns.spawn(program, args, log);
    };
    let dir = acc
        .dir
        .join(format!("p{}", acc.next.fetch_add(1, Ordering::Relaxed)));
    let ready = std::fs::create_dir(&dir)
        .and_then(|()| std::fs::write(dir.join(TCP_LIMIT), "-1"))
        .map_err(|e| eprintln!("{}: {e}; {program} runs unmeasured", dir.display()));
    let (Ok(()), Some(procs)) = (ready, dir.join("cgroup.procs").to_str().map(str::to_owned))
    else {
        return ns.spawn(program, args, log);
    };
    // sh moves itself, then execs `ip netns exec`, which execs the
    // program: one pid throughout, and nothing allocated before the move.
    // Should the move fail, the program runs all the same, unmeasured
    // ([`peak_kib`] checks it is there).
    let script = format!("echo $$ > '{procs}' 2>/dev/null; exec \"$@\"");
    let proc = ns.spawn_under(&["sh", "-c", &script, "sh"], program, args, log);
    acc.by_pid
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(proc.pid(), dir);
    proc
}

/// The most kernel socket memory `pid`'s sockets held at once, in KiB;
/// `None` where it is not measured (no accounting, or `pid` is not in its
/// cgroup).
pub fn peak_kib(pid: u32) -> Option<u64> {
    let acc = ACCOUNTING.get()?.as_ref()?;
    let by_pid = acc.by_pid.lock().unwrap_or_else(|e| e.into_inner());
    let dir = by_pid.get(&pid)?;
    let members = std::fs::read_to_string(dir.join("cgroup.procs")).ok()?;
    if !members.lines().any(|l| l.trim() == pid.to_string()) {
        return None;
    }
    let bytes: u64 = std::fs::read_to_string(dir.join(TCP_PEAK))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(bytes / 1024)
}

/// Removes this run's cgroups once their processes have exited.
pub fn cleanup() {
    if let Some(Some(acc)) = ACCOUNTING.get() {
        remove_run(&acc.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::v1_memory_path;

    #[test]
    fn the_memory_line_of_a_v1_or_hybrid_host_is_found() {
        let v1 = "12:pids:/user.slice\n9:memory:/user.slice/session-1.scope\n0::/user.slice\n";
        assert_eq!(v1_memory_path(v1), Some("/user.slice/session-1.scope"));
        // Controllers mounted together share a line.
        assert_eq!(v1_memory_path("4:blkio,memory:/ci/job\n"), Some("/ci/job"));
        // A path may itself hold a colon.
        assert_eq!(v1_memory_path("3:memory:/a:b\n"), Some("/a:b"));
    }

    #[test]
    fn a_v2_host_or_another_controller_alone_has_none() {
        assert_eq!(v1_memory_path("0::/init.scope\n"), None);
        // `memory_recursiveprot` is a mount option, never a controller,
        // and a name that only contains "memory" is not it.
        assert_eq!(v1_memory_path("5:hugetlb,memoryx:/x\n"), None);
        assert_eq!(v1_memory_path(""), None);
        assert_eq!(v1_memory_path("garbage without colons\n"), None);
    }
}
