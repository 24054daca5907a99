//! Proxy credentials for the CONNECT ingress: `--connect-token-file`.
//!
//! The file holds one `name:token` per line (`#` starts a comment). A
//! request proves it is `name` with `Proxy-Authorization: Basic
//! base64(name:token)` (what Prometheus sends for `proxy_url:
//! http://name:token@host:port`) or `Proxy-Authorization: Bearer token`.
//! Only SHA-256 digests of the tokens are kept in memory, and they are
//! compared in constant time.
//!
//! The file is read again when it changes (checked every
//! [`RELOAD_EVERY`]): a Kubernetes Secret update reaches running servers.
//! A file that does not parse is refused with a log line that names the
//! line and the problem, and the tokens already loaded stay in force.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use base64::Engine;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// How often the token file is checked for changes.
pub const RELOAD_EVERY: Duration = Duration::from_secs(2);
/// Shortest token accepted: 16 characters (a guessable token is no
/// credential).
pub const MIN_TOKEN: usize = 16;
/// Largest token file read.
pub const MAX_FILE: u64 = 1024 * 1024;

/// Why a token file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    #[error("cannot read the token file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the token file {path} is over {MAX_FILE} bytes")]
    TooLarge { path: PathBuf },
    #[error("{path}:{line}: {problem}")]
    Line {
        path: PathBuf,
        line: usize,
        problem: String,
    },
    #[error("the token file {path} holds no token")]
    Empty { path: PathBuf },
}

/// Parsed tokens: name → SHA-256 of its token.
#[derive(Debug, Default, Clone)]
pub struct Tokens {
    by_name: HashMap<String, [u8; 32]>,
}

fn digest(token: &[u8]) -> [u8; 32] {
    Sha256::digest(token).into()
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

impl Tokens {
    /// Parses the file's text; `path` only names it in errors.
    pub fn parse(path: &Path, text: &str) -> Result<Tokens, TokenFileError> {
        let mut by_name = HashMap::new();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bad = |problem: String| TokenFileError::Line {
                path: path.to_owned(),
                line: i + 1,
                problem,
            };
            let (name, token) = line
                .split_once(':')
                .ok_or_else(|| bad("expected name:token".into()))?;
            if !valid_name(name) {
                return Err(bad(format!(
                    "the name {name:?} is not 1-63 letters, digits, '.', '_' or '-'"
                )));
            }
            if token.len() < MIN_TOKEN || token.chars().any(char::is_whitespace) {
                return Err(bad(format!(
                    "the token of {name} must be at least {MIN_TOKEN} characters, without spaces"
                )));
            }
            if by_name
                .insert(name.to_owned(), digest(token.as_bytes()))
                .is_some()
            {
                return Err(bad(format!("{name} is listed twice")));
            }
        }
        if by_name.is_empty() {
            return Err(TokenFileError::Empty {
                path: path.to_owned(),
            });
        }
        Ok(Tokens { by_name })
    }

    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    /// The name a `Proxy-Authorization` value proves, if any.
    pub fn check(&self, header: &str) -> Option<&str> {
        let (scheme, value) = header.trim().split_once(' ')?;
        let value = value.trim();
        if scheme.eq_ignore_ascii_case("basic") {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(value)
                .ok()?;
            let decoded = String::from_utf8(decoded).ok()?;
            let (name, token) = decoded.split_once(':')?;
            let (known, want) = self.by_name.get_key_value(name)?;
            bool::from(digest(token.as_bytes()).ct_eq(want)).then_some(known.as_str())
        } else if scheme.eq_ignore_ascii_case("bearer") {
            let got = digest(value.as_bytes());
            // Every entry is compared, so the time does not say which.
            let mut found = None;
            for (name, want) in &self.by_name {
                if bool::from(got.ct_eq(want)) {
                    found = Some(name.as_str());
                }
            }
            found
        } else {
            None
        }
    }
}

/// What identifies one version of the file on disk.
type Stamp = (SystemTime, u64, u64);

fn stamp(path: &Path) -> std::io::Result<Stamp> {
    let meta = std::fs::metadata(path)?;
    use std::os::unix::fs::MetadataExt;
    Ok((meta.modified()?, meta.len(), meta.ino()))
}

fn load(path: &Path) -> Result<Tokens, TokenFileError> {
    let read = |source| TokenFileError::Read {
        path: path.to_owned(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(read)?;
    if meta.len() > MAX_FILE {
        return Err(TokenFileError::TooLarge {
            path: path.to_owned(),
        });
    }
    let text = std::fs::read_to_string(path).map_err(read)?;
    Tokens::parse(path, &text)
}

/// The tokens in force, reloaded when the file changes.
#[derive(Debug)]
pub struct TokenFile {
    path: PathBuf,
    current: RwLock<Arc<Tokens>>,
    stamp: std::sync::Mutex<Option<Stamp>>,
}

impl TokenFile {
    /// Loads `path`; a file that cannot be used is an error at start.
    pub fn open(path: &Path) -> Result<Arc<TokenFile>, TokenFileError> {
        let stamp = stamp(path).ok();
        let tokens = load(path)?;
        Ok(Arc::new(TokenFile {
            path: path.to_owned(),
            current: RwLock::new(Arc::new(tokens)),
            stamp: std::sync::Mutex::new(stamp),
        }))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The tokens in force now.
    pub fn tokens(&self) -> Arc<Tokens> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Reads the file again if it changed. `Ok(true)`: new tokens are in
    /// force; `Ok(false)`: unchanged; `Err`: the new file was refused and
    /// the old tokens stay.
    pub fn reload_if_changed(&self) -> Result<bool, TokenFileError> {
        let now = stamp(&self.path).ok();
        {
            let mut last = self.stamp.lock().unwrap_or_else(|e| e.into_inner());
            if now == *last {
                return Ok(false);
            }
            *last = now;
        }
        let tokens = load(&self.path)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(tokens);
        Ok(true)
    }

    /// Checks the file every [`RELOAD_EVERY`] until the task is dropped;
    /// `on_reload` counts each outcome ("ok" or "error").
    pub async fn watch(self: Arc<Self>, on_reload: impl Fn(&'static str)) {
        let mut tick = tokio::time::interval(RELOAD_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            match self.reload_if_changed() {
                Ok(false) => {}
                Ok(true) => {
                    on_reload("ok");
                    tracing::info!(path = %self.path.display(), tokens = self.tokens().len(), "proxy tokens reloaded");
                }
                Err(e) => {
                    on_reload("error");
                    tracing::error!("{e}; the tokens loaded before stay in force");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "# Prometheus, and a second client\nprometheus:0123456789abcdef0123\n\n  ops:ffffffffffffffffffff  \n";

    fn parse(text: &str) -> Result<Tokens, TokenFileError> {
        Tokens::parse(Path::new("tokens"), text)
    }

    fn basic(user_pass: &str) -> String {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(user_pass)
        )
    }

    #[test]
    fn basic_and_bearer_prove_a_name() {
        let t = parse(FILE).unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(
            t.check(&basic("prometheus:0123456789abcdef0123")),
            Some("prometheus")
        );
        assert_eq!(t.check("Bearer ffffffffffffffffffff"), Some("ops"));
        assert_eq!(t.check("bearer ffffffffffffffffffff"), Some("ops"));
        for wrong in [
            basic("prometheus:0123456789abcdef0124"),
            basic("ops:0123456789abcdef0123"),
            basic("nobody:0123456789abcdef0123"),
            basic("prometheus"),
            "Bearer 0123456789abcdef0124".into(),
            "Digest x".into(),
            "Basic !!!".into(),
            "".into(),
        ] {
            assert_eq!(t.check(&wrong), None, "{wrong}");
        }
    }

    #[test]
    fn bad_files_name_the_line_and_the_problem() {
        let e = |text: &str| parse(text).unwrap_err().to_string();
        assert_eq!(e("no-colon"), "tokens:1: expected name:token");
        assert!(e("a:short").contains("at least 16 characters"));
        assert!(e("bad name:0123456789abcdef").contains("is not 1-63 letters"));
        assert!(
            e("a:0123456789abcdef\na:0123456789abcdeg").starts_with("tokens:2: a is listed twice")
        );
        assert_eq!(e("# nothing\n"), "the token file tokens holds no token");
    }

    #[test]
    fn a_changed_file_is_reloaded_and_a_broken_one_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        std::fs::write(&path, "a:0123456789abcdef\n").unwrap();
        let file = TokenFile::open(&path).unwrap();
        assert!(!file.reload_if_changed().unwrap());
        // Written as a Secret update is: a new file moved into place.
        let next = dir.path().join("next");
        std::fs::write(&next, "b:fedcba9876543210\n").unwrap();
        std::fs::rename(&next, &path).unwrap();
        assert!(file.reload_if_changed().unwrap());
        assert_eq!(file.tokens().check("Bearer fedcba9876543210"), Some("b"));
        assert_eq!(file.tokens().check("Bearer 0123456789abcdef"), None);
        std::fs::write(&next, "broken\n").unwrap();
        std::fs::rename(&next, &path).unwrap();
        assert!(file.reload_if_changed().is_err());
        assert_eq!(
            file.tokens().check("Bearer fedcba9876543210"),
            Some("b"),
            "kept"
        );
    }
}
