//! The instance lock: how an agent process learns that another one still
//! runs on its node (`--instance-lock`).
//!
//! A DaemonSet rolling update with surge starts the new agent pod while
//! the old one still serves. Both see the node's `hostPath`; the running
//! process holds an exclusive lock (`flock`) on a file there, which the
//! kernel releases when the process ends, however it ends. A process that
//! finds the lock held is a successor: it says so in every `Hello`
//! (`SUCCESSOR`), so a server routes new streams to it and lets the old
//! process's connections finish theirs instead of closing them, and it
//! keeps trying for the lock, taking it (and the admin address) once the
//! old process is gone.
//!
//! An agent of a release before the lock does not hold it, but it does
//! hold the admin address (`--admin-listen`, on the host network): with
//! `--instance-lock` set, finding that address in use is the same sign, so
//! the first rolling update onto this release is a succession too.

use std::fs::{File, OpenOptions, TryLockError};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// How often a successor tries for the lock again.
pub const RETRY: Duration = Duration::from_millis(500);

/// Whether another agent process on this node still runs (shared with
/// every connection, which reads it for each `Hello`). Two signs: it holds
/// the lock, or (an agent too old to take the lock) the admin address.
#[derive(Clone, Debug, Default)]
pub struct Predecessor(Arc<Signs>);

#[derive(Debug, Default)]
struct Signs {
    lock: AtomicBool,
    admin: AtomicBool,
}

impl Predecessor {
    /// Whether another agent process on this node still runs.
    pub fn alive(&self) -> bool {
        self.0.lock.load(Ordering::Relaxed) || self.0.admin.load(Ordering::Relaxed)
    }

    fn set(&self, alive: bool) {
        self.0.lock.store(alive, Ordering::Relaxed);
    }

    /// Another process holds the admin address (`true`), or this one
    /// serves it now (`false`).
    pub fn set_admin_held(&self, held: bool) {
        self.0.admin.store(held, Ordering::Relaxed);
    }
}

/// Why the lock cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("--instance-lock {}: {reason}", .path.display())]
pub struct LockError {
    pub path: PathBuf,
    pub reason: String,
}

/// The lock, held by this process or waited for.
#[derive(Debug)]
pub enum Lock {
    /// Held: released when dropped (or when the process ends).
    Held(File),
    /// Another process holds it; [`Lock::wait`] takes it once that one ends.
    Waiting(File),
}

impl Lock {
    /// Opens (creating it, mode 0600) and tries to take the lock at `path`;
    /// records in `predecessor` whether another process holds it.
    pub fn take(path: &Path, predecessor: &Predecessor) -> Result<Lock, LockError> {
        let err = |reason: String| LockError {
            path: path.to_owned(),
            reason,
        };
        let mut options = OpenOptions::new();
        options.read(true).write(true).create(true).truncate(false);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let file = options
            .open(path)
            .map_err(|e| err(format!("cannot open: {e}")))?;
        match file.try_lock() {
            Ok(()) => {
                predecessor.set(false);
                Ok(Lock::Held(file))
            }
            Err(TryLockError::WouldBlock) => {
                predecessor.set(true);
                Ok(Lock::Waiting(file))
            }
            Err(TryLockError::Error(e)) => Err(err(format!("cannot lock: {e}"))),
        }
    }

    /// Holds the lock until dropped, first waiting for the other process
    /// to end if it holds it; clears `predecessor` once taken.
    pub async fn hold(self, predecessor: Predecessor, path: PathBuf) -> File {
        let file = match self {
            Lock::Held(file) => return file,
            Lock::Waiting(file) => file,
        };
        loop {
            tokio::time::sleep(RETRY).await;
            match file.try_lock() {
                Ok(()) => {
                    predecessor.set(false);
                    tracing::info!(
                        lock = %path.display(),
                        "the agent process this one succeeded has ended; this one is the node's agent now"
                    );
                    return file;
                }
                Err(TryLockError::WouldBlock) => {}
                Err(TryLockError::Error(e)) => {
                    // Nothing left to learn from it: stop claiming to be a
                    // successor, which would keep the other process out.
                    predecessor.set(false);
                    tracing::warn!(lock = %path.display(), "cannot lock: {e}; no longer waiting");
                    return file;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_second_process_is_a_successor_until_the_first_ends() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.lock");
        let first = Predecessor::default();
        let lock = Lock::take(&path, &first).unwrap();
        assert!(!first.alive());
        let held = lock.hold(first.clone(), path.clone()).await;

        // A second open file description: as another process sees it.
        let second = Predecessor::default();
        let waiting = Lock::take(&path, &second).unwrap();
        assert!(matches!(waiting, Lock::Waiting(_)));
        assert!(second.alive());
        let took = tokio::spawn(waiting.hold(second.clone(), path.clone()));
        tokio::time::sleep(RETRY * 4).await;
        assert!(second.alive(), "the first still runs");
        assert!(!took.is_finished());
        drop(held);
        let _file = took.await.unwrap();
        assert!(!second.alive(), "the lock is this one's now");
    }

    #[test]
    fn a_lock_that_cannot_be_opened_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("missing").join("agent.lock");
        let e = Lock::take(&path, &Predecessor::default()).unwrap_err();
        assert!(e.to_string().contains("agent.lock: cannot open"), "{e}");
    }
}
