//! File descriptors. Many distributions start services with a soft limit of
//! 1,024 open files; a tunnel server holding a socket per client connection
//! runs out long before its other limits, and then its admin listener
//! cannot accept the liveness probe either. Both binaries raise the soft
//! limit to the hard limit at start and size their connection caps from
//! what they got, keeping a reserve for everything else.

use std::io;

/// The open-files limit after [`raise_nofile`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FdLimit {
    /// The soft limit before.
    pub before: u64,
    /// The soft limit now (the hard limit, when raising worked).
    pub soft: u64,
    pub hard: u64,
}

impl FdLimit {
    /// How many connections fit under the soft limit when `reserve`
    /// descriptors stay free for listeners, agents, logs and certificate
    /// reloads; never less than `floor`.
    pub fn share(&self, reserve: u64, floor: usize) -> usize {
        let share = self.soft.saturating_sub(reserve);
        usize::try_from(share).unwrap_or(usize::MAX).max(floor)
    }
}

/// Raises the soft RLIMIT_NOFILE to the hard limit and says what it is.
pub fn raise_nofile() -> io::Result<FdLimit> {
    let (before, hard) = rlimit::Resource::NOFILE.get()?;
    let soft = rlimit::increase_nofile_limit(hard)?;
    Ok(FdLimit { before, soft, hard })
}

/// [`raise_nofile`], logged; on failure the current limit, also logged.
pub fn raise_nofile_logged() -> FdLimit {
    match raise_nofile() {
        Ok(limit) => {
            if limit.soft > limit.before {
                tracing::info!(
                    from = limit.before,
                    to = limit.soft,
                    "raised the open-files limit to the hard limit"
                );
            }
            limit
        }
        Err(e) => {
            let (soft, hard) = rlimit::Resource::NOFILE.get().unwrap_or((1024, 1024));
            tracing::warn!(soft, hard, "cannot raise the open-files limit: {e}");
            FdLimit {
                before: soft,
                soft,
                hard,
            }
        }
    }
}

/// Whether an accept error means the process or the system is out of file
/// descriptors (then the caller should back off, not spin).
pub fn is_fd_exhaustion(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(code) if code == libc_emfile() || code == libc_enfile())
}

// EMFILE and ENFILE on Linux (and every other Unix in use).
const fn libc_emfile() -> i32 {
    24
}
const fn libc_enfile() -> i32 {
    23
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_share_keeps_the_reserve_and_a_floor() {
        let limit = FdLimit {
            before: 1024,
            soft: 1024,
            hard: 1024,
        };
        assert_eq!(limit.share(256, 16), 768);
        assert_eq!(limit.share(4096, 16), 16);
    }

    #[test]
    fn raising_never_lowers() {
        let (before, _) = rlimit::Resource::NOFILE.get().unwrap();
        let limit = raise_nofile().unwrap();
        assert!(limit.soft >= before);
        assert!(limit.soft <= limit.hard);
    }

    #[test]
    fn emfile_and_enfile_are_exhaustion() {
        assert!(is_fd_exhaustion(&io::Error::from_raw_os_error(24)));
        assert!(is_fd_exhaustion(&io::Error::from_raw_os_error(23)));
        assert!(!is_fd_exhaustion(&io::Error::from_raw_os_error(104)));
    }
}
