//! Bootstrap tokens for agent enrollment, in the manner of kubeadm's
//! `abcdef.0123456789abcdef` tokens.
//!
//! A token is `ID.SECRET`: the ID names it (in logs, in the tokens file, on
//! `tunnel-certs token revoke`), the secret proves it. The tokens file keeps
//! only `sha256:` hashes of the secrets, so reading it does not let anyone
//! enroll. An agent pins the CA it enrolls against with [`ca_cert_hash`]
//! (kubeadm's `--discovery-token-ca-cert-hash`).

use std::collections::HashMap;
use std::fmt;
use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use ring::rand::{SecureRandom, SystemRandom};
use rustls::pki_types::CertificateDer;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Characters of the token ID.
pub const ID_LEN: usize = 6;
/// Characters of the token secret.
pub const SECRET_LEN: usize = 16;
/// The largest tokens file [`TokensFile::load`] reads (1 MiB).
pub const MAX_FILE_BYTES: usize = 1 << 20;
/// The most records a tokens file may hold.
pub const MAX_RECORDS: usize = 100_000;
/// The longest node name or pattern in a [`Subject`].
pub const MAX_SUBJECT_LEN: usize = 253;

/// What token IDs and secrets are drawn from.
const ALPHABET: &[u8; 36] = b"abcdefghijklmnopqrstuvwxyz0123456789";
/// The first line [`TokensFile::render`] writes.
const HEADER: &str = "# edge-tunnel bootstrap tokens: the secrets are stored only as hashes";
const HASH_PREFIX: &str = "sha256:";

/// Why a token, a tokens file or a CA pin could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error("{path}:{line}: {detail}")]
    Parse {
        path: PathBuf,
        line: usize,
        detail: String,
    },
    #[error("{path} is too large: {detail}")]
    TooLarge { path: PathBuf, detail: String },
    /// A malformed `ID.SECRET`; the message never holds the secret.
    #[error("invalid bootstrap token: {0}")]
    BadToken(String),
    #[error("invalid token subject: {0}")]
    BadSubject(String),
    #[error("invalid CA certificate hash: {0}")]
    BadCaHash(String),
    #[error("the CA certificate cannot be parsed: {0}")]
    BadCertificate(String),
}

/// A bootstrap token: `ID.SECRET`, ID 6 chars and SECRET 16 chars of [a-z0-9].
#[derive(Clone)]
pub struct BootstrapToken {
    pub id: String,
    pub secret: String,
}

impl BootstrapToken {
    /// Parses `ID.SECRET`. The error says what is wrong without repeating
    /// the secret.
    pub fn parse(s: &str) -> Result<BootstrapToken, TokenError> {
        const FORMAT: &str = "expected ID.SECRET: 6 and 16 characters of a-z and 0-9";
        let bad = |what: String| Err(TokenError::BadToken(format!("{what} ({FORMAT})")));
        let Some((id, secret)) = s.split_once('.') else {
            return bad(format!("it has no '.' ({} characters)", s.chars().count()));
        };
        if secret.contains('.') {
            return bad("it has more than one '.'".to_owned());
        }
        if id.chars().count() != ID_LEN {
            return bad(format!(
                "the ID has {} characters, not {ID_LEN}",
                id.chars().count()
            ));
        }
        if let Some(c) = id.chars().find(|c| !is_token_char(*c)) {
            return bad(format!("the ID {id:?} holds {}", describe_char(c)));
        }
        if secret.chars().count() != SECRET_LEN {
            return bad(format!(
                "the secret has {} characters, not {SECRET_LEN}",
                secret.chars().count()
            ));
        }
        if let Some((at, c)) = secret.chars().enumerate().find(|(_, c)| !is_token_char(*c)) {
            // Which kind of character, and where, but not the character.
            let kind = if c.is_ascii_uppercase() {
                "an uppercase letter"
            } else {
                "a character other than a-z and 0-9"
            };
            return bad(format!("the secret holds {kind} at position {}", at + 1));
        }
        Ok(BootstrapToken {
            id: id.to_owned(),
            secret: secret.to_owned(),
        })
    }

    /// A new random token, drawn uniformly from [a-z0-9] with the system's
    /// secure random generator.
    ///
    /// # Panics
    ///
    /// If the system random generator fails (`getrandom` does not on any
    /// supported system).
    pub fn generate() -> BootstrapToken {
        let rng = SystemRandom::new();
        let mut chars = random_chars(&rng, ID_LEN + SECRET_LEN).into_iter();
        let id = chars.by_ref().take(ID_LEN).collect();
        let secret = chars.collect();
        BootstrapToken { id, secret }
    }

    /// `sha256:` and the lowercase hex SHA-256 of the secret: what the
    /// tokens file stores.
    pub fn secret_hash(&self) -> String {
        sha256_pin(self.secret.as_bytes())
    }
}

/// `len` characters drawn uniformly from [`ALPHABET`]: bytes of 252 and
/// above (252 = 7 * 36) are rejected so every character is equally likely.
fn random_chars(rng: &SystemRandom, len: usize) -> Vec<char> {
    const LIMIT: u8 = (256 - 256 % ALPHABET.len()) as u8;
    let mut out = Vec::with_capacity(len);
    let mut buf = [0u8; 64];
    while out.len() < len {
        rng.fill(&mut buf)
            .expect("the system random generator failed");
        for &b in &buf {
            if b < LIMIT && out.len() < len {
                out.push(char::from(ALPHABET[usize::from(b) % ALPHABET.len()]));
            }
        }
    }
    out
}

fn is_token_char(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit()
}

fn describe_char(c: char) -> String {
    if c.is_ascii_uppercase() {
        "an uppercase letter".to_owned()
    } else {
        format!("{c:?}, which is not a-z or 0-9")
    }
}

impl FromStr for BootstrapToken {
    type Err = TokenError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        BootstrapToken::parse(s)
    }
}

impl fmt::Display for BootstrapToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.id, self.secret)
    }
}

impl fmt::Debug for BootstrapToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        struct Redacted;
        impl fmt::Debug for Redacted {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("<redacted>")
            }
        }
        f.debug_struct("BootstrapToken")
            .field("id", &self.id)
            .field("secret", &Redacted)
            .finish()
    }
}

/// Whom a token may enroll.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Subject {
    /// Exactly this node name.
    Node(String),
    /// Node names matching this glob: `*` is any run of characters (also
    /// none), `?` exactly one.
    Pattern(String),
}

impl Subject {
    /// Whether `node` may enroll with a token for this subject. Node names
    /// compare exactly (case-sensitively).
    pub fn matches(&self, node: &str) -> bool {
        match self {
            Subject::Node(name) => name == node,
            Subject::Pattern(glob) => glob_matches(glob, node),
        }
    }

    /// Checks the name or pattern: 1..=253 characters of [A-Za-z0-9.-],
    /// and for a pattern also `*` and `?`.
    pub fn validate(&self) -> Result<(), TokenError> {
        let (what, text, wildcards) = match self {
            Subject::Node(name) => ("node name", name, false),
            Subject::Pattern(glob) => ("node pattern", glob, true),
        };
        if text.is_empty() || text.len() > MAX_SUBJECT_LEN {
            return Err(TokenError::BadSubject(format!(
                "the {what} must be 1 to {MAX_SUBJECT_LEN} characters, not {}",
                text.len()
            )));
        }
        let allowed = |c: char| {
            c.is_ascii_alphanumeric()
                || c == '.'
                || c == '-'
                || (wildcards && (c == '*' || c == '?'))
        };
        if let Some(c) = text.chars().find(|c| !allowed(*c)) {
            let set = if wildcards {
                "A-Z, a-z, 0-9, '.', '-', '*' and '?'"
            } else {
                "A-Z, a-z, 0-9, '.' and '-'"
            };
            return Err(TokenError::BadSubject(format!(
                "the {what} {text:?} holds {c:?}; only {set} are allowed"
            )));
        }
        Ok(())
    }
}

impl fmt::Display for Subject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Subject::Node(name) => write!(f, "node={name}"),
            Subject::Pattern(glob) => write!(f, "pattern={glob}"),
        }
    }
}

/// Glob matching with `*` and `?`, two pointers and one backtrack point
/// (the last `*` seen): O(pattern × text) at worst, never exponential.
fn glob_matches(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0, 0);
    // The last `*` in the pattern and where in the text its run ends now.
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if let Some((star_pi, star_ti)) = star {
            // Let the last `*` take one more character and retry after it.
            star = Some((star_pi, star_ti + 1));
            pi = star_pi + 1;
            ti = star_ti + 1;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// One token in the tokens file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenRecord {
    pub id: String,
    /// `sha256:HEX` of the secret.
    pub hash: String,
    pub subject: Subject,
    /// Unix seconds; the token is refused from then on.
    pub expires: u64,
    /// How many enrollments it allows, >= 1.
    pub uses: u32,
    /// How many it has done.
    pub used: u32,
    pub revoked: bool,
}

impl TokenRecord {
    /// The record's line in the tokens file (no newline).
    fn render(&self) -> String {
        let mut line = format!(
            "{} hash={} {} expires={} uses={} used={}",
            self.id, self.hash, self.subject, self.expires, self.uses, self.used
        );
        if self.revoked {
            line.push_str(" revoked");
        }
        line
    }

    /// Parses one non-comment line; the error is the detail only.
    fn parse_line(line: &str) -> Result<TokenRecord, String> {
        let mut fields = line.split(' ');
        let id = fields.next().unwrap_or_default();
        if id.len() != ID_LEN || !id.chars().all(is_token_char) {
            return Err(format!(
                "token id {id:?} is not {ID_LEN} characters of a-z and 0-9"
            ));
        }
        let mut seen: Vec<&str> = Vec::new();
        let (mut hash, mut subject, mut expires, mut uses, mut used) =
            (None, None, None, None, None);
        let mut revoked = false;
        for field in fields {
            if field.is_empty() {
                return Err(
                    "empty field (fields are separated by single spaces, with none at the end)"
                        .to_owned(),
                );
            }
            let (key, value) = match field.split_once('=') {
                Some((key, value)) => (key, Some(value)),
                None => (field, None),
            };
            if seen.contains(&key) {
                return Err(format!("field {key} appears twice"));
            }
            seen.push(key);
            match (key, value) {
                ("revoked", None) => revoked = true,
                ("revoked", Some(_)) => {
                    return Err("field revoked takes no value (write just `revoked`)".to_owned())
                }
                ("hash", Some(v)) => {
                    check_hash(v).map_err(|e| format!("field hash: {e}"))?;
                    hash = Some(v.to_owned());
                }
                ("node" | "pattern", Some(v)) => {
                    if subject.is_some() {
                        return Err("both node= and pattern= are given; a token has one".to_owned());
                    }
                    let s = if key == "node" {
                        Subject::Node(v.to_owned())
                    } else {
                        Subject::Pattern(v.to_owned())
                    };
                    s.validate().map_err(|e| format!("field {key}: {e}"))?;
                    subject = Some(s);
                }
                ("expires", Some(v)) => expires = Some(parse_number::<u64>(key, v, u64::MAX)?),
                ("uses", Some(v)) => {
                    let n = parse_number::<u32>(key, v, u32::MAX.into())?;
                    if n == 0 {
                        return Err("field uses must be at least 1".to_owned());
                    }
                    uses = Some(n);
                }
                ("used", Some(v)) => used = Some(parse_number::<u32>(key, v, u32::MAX.into())?),
                ("hash" | "node" | "pattern" | "expires" | "uses" | "used", None) => {
                    return Err(format!("field {key} needs a value ({key}=...)"))
                }
                _ => return Err(format!("unknown field {key:?}")),
            }
        }
        let missing = |name: &str| format!("field {name}= is missing");
        Ok(TokenRecord {
            id: id.to_owned(),
            hash: hash.ok_or_else(|| missing("hash"))?,
            subject: subject.ok_or_else(|| "field node= or pattern= is missing".to_owned())?,
            expires: expires.ok_or_else(|| missing("expires"))?,
            uses: uses.ok_or_else(|| missing("uses"))?,
            used: used.ok_or_else(|| missing("used"))?,
            revoked,
        })
    }
}

/// A decimal number of at most `max`, digits only.
fn parse_number<T: FromStr>(key: &str, value: &str, max: u64) -> Result<T, String> {
    // FromStr for integers takes a leading '+'; the file does not.
    if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) {
        if let Ok(n) = value.parse() {
            return Ok(n);
        }
    }
    Err(format!(
        "field {key}: {value:?} is not a whole number from 0 to {max}"
    ))
}

/// `sha256:` and 64 lowercase hex digits.
fn check_hash(value: &str) -> Result<(), String> {
    let Some(hex) = value.strip_prefix(HASH_PREFIX) else {
        return Err(format!("{value:?} does not start with {HASH_PREFIX}"));
    };
    if hex.len() != 64
        || !hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(format!(
            "expected {HASH_PREFIX} and 64 lowercase hex digits, found {value:?}"
        ));
    }
    Ok(())
}

/// The tokens file: one [`TokenRecord`] per line.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TokensFile {
    pub records: Vec<TokenRecord>,
}

impl TokensFile {
    /// Reads and parses `path`; a missing file is an error
    /// ([`TokenError::Read`] with [`io::ErrorKind::NotFound`]).
    pub fn load(path: &Path) -> Result<TokensFile, TokenError> {
        let read_err = |source| TokenError::Read {
            path: path.to_owned(),
            source,
        };
        let file = fs::File::open(path).map_err(read_err)?;
        let mut bytes = Vec::new();
        file.take(MAX_FILE_BYTES as u64 + 1)
            .read_to_end(&mut bytes)
            .map_err(read_err)?;
        if bytes.len() > MAX_FILE_BYTES {
            return Err(too_large_bytes(path));
        }
        let text = match String::from_utf8(bytes) {
            Ok(text) => text,
            Err(e) => {
                let good = &e.as_bytes()[..e.utf8_error().valid_up_to()];
                let line = good.iter().filter(|&&b| b == b'\n').count() + 1;
                return Err(TokenError::Parse {
                    path: path.to_owned(),
                    line,
                    detail: "not UTF-8 text".to_owned(),
                });
            }
        };
        TokensFile::parse(&text, path)
    }

    /// Like [`TokensFile::load`], but a missing file is an empty one.
    pub fn load_or_empty(path: &Path) -> Result<TokensFile, TokenError> {
        match TokensFile::load(path) {
            Err(TokenError::Read { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                Ok(TokensFile::default())
            }
            other => other,
        }
    }

    /// Parses the text of a tokens file; `path` names it in errors, which
    /// also give the line number and the field at fault.
    pub fn parse(text: &str, path: &Path) -> Result<TokensFile, TokenError> {
        if text.len() > MAX_FILE_BYTES {
            return Err(too_large_bytes(path));
        }
        let mut records = Vec::new();
        let mut lines_of: HashMap<String, usize> = HashMap::new();
        for (index, line) in text.lines().enumerate() {
            let number = index + 1;
            let trimmed = line.trim();
            if trimmed.is_empty() || trimmed.starts_with('#') {
                continue;
            }
            let parse_err = |detail: String| TokenError::Parse {
                path: path.to_owned(),
                line: number,
                detail,
            };
            let record = TokenRecord::parse_line(line).map_err(parse_err)?;
            if let Some(first) = lines_of.get(&record.id) {
                return Err(parse_err(format!(
                    "duplicate token id {} (first on line {first})",
                    record.id
                )));
            }
            if records.len() == MAX_RECORDS {
                return Err(too_many_records(path));
            }
            lines_of.insert(record.id.clone(), number);
            records.push(record);
        }
        Ok(TokensFile { records })
    }

    /// The file's text: a header comment, then one line per record.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(HEADER.len() + 1 + self.records.len() * 128);
        out.push_str(HEADER);
        out.push('\n');
        for record in &self.records {
            out.push_str(&record.render());
            out.push('\n');
        }
        out
    }

    /// Writes the file atomically, mode 0600: a temporary file in the same
    /// directory (created 0600), synced, then renamed over `path`. Refuses
    /// to write a file [`TokensFile::load`] would refuse as too large.
    pub fn save(&self, path: &Path) -> Result<(), TokenError> {
        if self.records.len() > MAX_RECORDS {
            return Err(too_many_records(path));
        }
        let text = self.render();
        if text.len() > MAX_FILE_BYTES {
            return Err(too_large_bytes(path));
        }
        crate::files::write_atomic(path, text.as_bytes(), 0o600).map_err(|e| match e {
            crate::CertError::Write { path, source } => TokenError::Write { path, source },
            other => TokenError::Write {
                path: path.to_owned(),
                source: io::Error::other(other.to_string()),
            },
        })
    }

    /// The record with this id.
    pub fn find(&self, id: &str) -> Option<&TokenRecord> {
        self.records.iter().find(|r| r.id == id)
    }

    /// The record with this id, to change.
    pub fn find_mut(&mut self, id: &str) -> Option<&mut TokenRecord> {
        self.records.iter_mut().find(|r| r.id == id)
    }

    /// Checks `token` for enrolling `node` at `now` (unix seconds). Does not record the use.
    pub fn check(
        &self,
        token: &BootstrapToken,
        node: &str,
        now: u64,
    ) -> Result<&TokenRecord, TokenRefusal> {
        let record = self.find(&token.id).ok_or(TokenRefusal::Unknown)?;
        let hash = token.secret_hash();
        if !bool::from(hash.as_bytes().ct_eq(record.hash.as_bytes())) {
            return Err(TokenRefusal::BadSecret);
        }
        if record.revoked {
            return Err(TokenRefusal::Revoked);
        }
        if now >= record.expires {
            return Err(TokenRefusal::Expired);
        }
        if record.used >= record.uses {
            return Err(TokenRefusal::UsedUp);
        }
        if !record.subject.matches(node) {
            return Err(TokenRefusal::NodeNotAllowed);
        }
        Ok(record)
    }
}

fn too_large_bytes(path: &Path) -> TokenError {
    TokenError::TooLarge {
        path: path.to_owned(),
        detail: format!("a tokens file holds at most {MAX_FILE_BYTES} bytes"),
    }
}

fn too_many_records(path: &Path) -> TokenError {
    TokenError::TooLarge {
        path: path.to_owned(),
        detail: format!("a tokens file holds at most {MAX_RECORDS} tokens"),
    }
}

/// Why a token was refused for an enrollment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenRefusal {
    #[error("the bootstrap token is not known (no token with its ID); check that it was copied whole, or create one with `tunnel-certs token create`")]
    Unknown,
    #[error("the bootstrap token's secret is wrong; check that it was copied whole, or create a new one with `tunnel-certs token create`")]
    BadSecret,
    #[error(
        "the bootstrap token has been revoked; create a new one with `tunnel-certs token create`"
    )]
    Revoked,
    #[error("the bootstrap token has expired; create a new one with `tunnel-certs token create`")]
    Expired,
    #[error("the bootstrap token has been used as many times as it allows; create a new one with `tunnel-certs token create` (--uses sets how many enrollments it allows)")]
    UsedUp,
    #[error("the bootstrap token is not for this node; create one with `tunnel-certs token create --node NAME` (or --node-pattern GLOB)")]
    NodeNotAllowed,
}

impl TokenRefusal {
    /// A short label for metrics and logs.
    pub fn label(self) -> &'static str {
        match self {
            TokenRefusal::Unknown => "unknown_token",
            TokenRefusal::BadSecret => "bad_secret",
            TokenRefusal::Revoked => "revoked",
            TokenRefusal::Expired => "expired",
            TokenRefusal::UsedUp => "used_up",
            TokenRefusal::NodeNotAllowed => "node_not_allowed",
        }
    }
}

/// The `--ca-cert-hash` pin of a CA certificate: "sha256:" + lowercase hex of SHA-256 over the certificate's DER SubjectPublicKeyInfo (as kubeadm's --discovery-token-ca-cert-hash).
pub fn ca_cert_hash(cert: &CertificateDer<'_>) -> Result<String, TokenError> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| TokenError::BadCertificate(e.to_string()))?;
    Ok(sha256_pin(parsed.tbs_certificate.subject_pki.raw))
}

/// Parses a "sha256:HEX" pin (64 hex chars, case-insensitive) into 32 bytes; clear error otherwise.
pub fn parse_ca_cert_hash(s: &str) -> Result<[u8; 32], TokenError> {
    let bad = |what: String| {
        Err(TokenError::BadCaHash(format!(
            "{what} (expected {HASH_PREFIX} and 64 hex digits, as `tunnel-certs ca-hash` prints)"
        )))
    };
    let Some(hex) = s.strip_prefix(HASH_PREFIX) else {
        return bad(format!("{s:?} does not start with {HASH_PREFIX}"));
    };
    if hex.len() != 64 {
        return bad(format!(
            "{} characters after {HASH_PREFIX}, not 64",
            hex.len()
        ));
    }
    let mut out = [0u8; 32];
    for (i, pair) in hex.as_bytes().chunks_exact(2).enumerate() {
        match (hex_value(pair[0]), hex_value(pair[1])) {
            (Some(hi), Some(lo)) => out[i] = hi << 4 | lo,
            _ => return bad(format!("{s:?} holds a character that is not a hex digit")),
        }
    }
    Ok(out)
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// `sha256:` and the lowercase hex SHA-256 of `bytes`.
fn sha256_pin(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    let mut out = String::with_capacity(HASH_PREFIX.len() + 64);
    out.push_str(HASH_PREFIX);
    for b in digest {
        out.push(char::from(b"0123456789abcdef"[usize::from(b >> 4)]));
        out.push(char::from(b"0123456789abcdef"[usize::from(b & 0xf)]));
    }
    out
}

/// An exclusive lock on a tokens (or state) file, held while it is read,
/// changed and written: `tunnel-certs token create/revoke` and the server
/// recording a use never lose each other's update. The lock is `flock` on
/// `FILE.lock` beside it; released when dropped.
#[derive(Debug)]
pub struct FileLock {
    _file: fs::File,
}

/// How long [`lock_file`] waits for another holder.
pub const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Locks `path` (see [`FileLock`]), waiting at most [`LOCK_WAIT`].
pub fn lock_file(path: &Path) -> Result<FileLock, TokenError> {
    let mut name = path.as_os_str().to_owned();
    name.push(".lock");
    let lock_path = PathBuf::from(name);
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|source| TokenError::Write {
            path: lock_path.clone(),
            source,
        })?;
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(FileLock { _file: file }),
            Err(fs::TryLockError::WouldBlock) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(fs::TryLockError::WouldBlock) => {
                return Err(TokenError::Write {
                    path: lock_path,
                    source: io::Error::new(
                        io::ErrorKind::WouldBlock,
                        format!("held by another process for more than {LOCK_WAIT:?}"),
                    ),
                })
            }
            Err(fs::TryLockError::Error(source)) => {
                return Err(TokenError::Write {
                    path: lock_path,
                    source,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    const SECRET: &str = "0123456789abcdef";

    fn token() -> BootstrapToken {
        BootstrapToken::parse(&format!("abcdef.{SECRET}")).unwrap()
    }

    fn record(id: &str, hash: String, subject: Subject) -> TokenRecord {
        TokenRecord {
            id: id.to_owned(),
            hash,
            subject,
            expires: 1_767_225_600,
            uses: 2,
            used: 0,
            revoked: false,
        }
    }

    fn bad_token(s: &str) -> String {
        match BootstrapToken::parse(s) {
            Err(TokenError::BadToken(e)) => e,
            other => panic!("{s:?} parsed as {other:?}"),
        }
    }

    fn parse_err(text: &str) -> (usize, String) {
        match TokensFile::parse(text, Path::new("/etc/tokens")) {
            Err(e @ TokenError::Parse { .. }) => {
                let message = e.to_string();
                assert!(message.starts_with("/etc/tokens:"), "{message}");
                let TokenError::Parse { line, detail, .. } = e else {
                    unreachable!()
                };
                (line, detail)
            }
            other => panic!("{text:?} parsed as {other:?}"),
        }
    }

    const HASH: &str = "sha256:0000000000000000000000000000000000000000000000000000000000000000";

    #[test]
    fn parses_good_tokens() {
        let t = token();
        assert_eq!(t.id, "abcdef");
        assert_eq!(t.secret, SECRET);
        assert_eq!(t.to_string(), format!("abcdef.{SECRET}"));
        let t: BootstrapToken = "a1b2c3.zzzzzzzzzzzzzzzz".parse().unwrap();
        assert_eq!(t.id, "a1b2c3");
    }

    #[test]
    fn refuses_bad_tokens_without_echoing_the_secret() {
        let cases = [
            ("abcde.0123456789abcdef", "the ID has 5 characters"),
            ("abcdefg.0123456789abcdef", "the ID has 7 characters"),
            ("abcdef.0123456789abcde", "the secret has 15 characters"),
            ("abcdef.0123456789abcdef0", "the secret has 17 characters"),
            ("ABCDEF.0123456789abcdef", "uppercase"),
            ("abcdef.0123456789ABCDEF", "uppercase letter at position 11"),
            ("abcdef0123456789abcdef", "no '.'"),
            ("abcdef.01234567.89abcdef", "more than one '.'"),
            ("abc_ef.0123456789abcdef", "'_'"),
            (
                "abcdef.0123456789abcde_",
                "other than a-z and 0-9 at position 16",
            ),
            ("", "no '.'"),
        ];
        for (input, want) in cases {
            let e = bad_token(input);
            assert!(e.contains(want), "{input:?}: {e}");
            if let Some((_, secret)) = input.split_once('.') {
                if secret.len() > 3 {
                    assert!(!e.contains(secret), "{input:?} echoed: {e}");
                }
            }
        }
        let e = bad_token("abcdef0123456789abcdef");
        assert!(!e.contains("0123456789abcdef"), "{e}");
    }

    #[test]
    fn generated_tokens_parse_and_differ() {
        let a = BootstrapToken::generate();
        let b = BootstrapToken::generate();
        let parsed = BootstrapToken::parse(&a.to_string()).unwrap();
        assert_eq!(
            (parsed.id.as_str(), parsed.secret.as_str()),
            (a.id.as_str(), a.secret.as_str())
        );
        assert_ne!(a.to_string(), b.to_string());
        BootstrapToken::parse(&b.to_string()).unwrap();
    }

    #[test]
    fn generation_covers_the_alphabet() {
        let rng = SystemRandom::new();
        let chars = random_chars(&rng, 36 * 200);
        let mut counts = [0usize; 36];
        for c in chars {
            let i = ALPHABET.iter().position(|&a| char::from(a) == c).unwrap();
            counts[i] += 1;
        }
        // 200 expected each; far outside chance only if biased or broken.
        assert!(
            counts.iter().all(|&n| (100..=320).contains(&n)),
            "{counts:?}"
        );
    }

    #[test]
    fn secret_hash_is_stable() {
        // SHA-256("0123456789abcdef"), computed independently.
        let want = "sha256:9f9f5111f7b27a781f1f1ddde5ebc2dd2b796bfc7365c9c28b548e564176929f";
        assert_eq!(token().secret_hash(), want);
        assert_eq!(token().secret_hash(), token().secret_hash());
        check_hash(&token().secret_hash()).unwrap();
    }

    #[test]
    fn debug_hides_the_secret() {
        let shown = format!("{:?}", token());
        assert_eq!(
            shown,
            r#"BootstrapToken { id: "abcdef", secret: <redacted> }"#
        );
        assert!(!format!("{:#?}", token()).contains(SECRET));
    }

    #[test]
    fn glob_matching() {
        let p = |g: &str| Subject::Pattern(g.to_owned());
        assert!(p("store-*").matches("store-1"));
        assert!(p("store-*").matches("store-"));
        assert!(!p("store-*").matches("store"));
        assert!(!p("store-*").matches("xstore-1"));
        assert!(p("*").matches(""));
        assert!(p("*").matches("anything.at-all"));
        assert!(p("a?c").matches("abc"));
        assert!(!p("a?c").matches("ac"));
        assert!(!p("a?c").matches("abbc"));
        assert!(p("*-edge-*").matches("eu-edge-7"));
        assert!(p("*-edge-*").matches("-edge-"));
        assert!(p("*-edge-*").matches("a-edge-b-edge-c"));
        assert!(!p("*-edge-*").matches("eu-edge"));
        assert!(!p("*-edge-*").matches("edge-1"));
        assert!(p("**a**").matches("a"));
        assert!(p("*a*b?").matches("xxaxxbz"));
        assert!(!p("*a*b?").matches("xxaxxb"));
        assert!(!p("").matches("a"));
        assert!(p("").matches(""));
        assert!(!p("abc").matches("ABC"));
        let n = Subject::Node("edge-1".to_owned());
        assert!(n.matches("edge-1"));
        assert!(!n.matches("edge-10"));
        assert!(!Subject::Node("edge-*".to_owned()).matches("edge-1"));
    }

    #[test]
    fn pathological_glob_is_fast() {
        let text = "a".repeat(60);
        let start = std::time::Instant::now();
        assert!(!glob_matches("a*a*a*a*a*b", &text));
        assert!(!glob_matches(&format!("{}b", "*a".repeat(30)), &text));
        assert!(glob_matches("a*a*a*a*a*", &text));
        assert!(start.elapsed() < std::time::Duration::from_millis(100));
    }

    #[test]
    fn subject_display_and_validate() {
        assert_eq!(Subject::Node("edge-1".into()).to_string(), "node=edge-1");
        assert_eq!(
            Subject::Pattern("store-*".into()).to_string(),
            "pattern=store-*"
        );
        Subject::Node("Edge-1.example".into()).validate().unwrap();
        Subject::Pattern("*.ex?mple".into()).validate().unwrap();
        assert!(Subject::Node("edge-*".into()).validate().is_err());
        assert!(Subject::Node(String::new()).validate().is_err());
        assert!(Subject::Node("a".repeat(254)).validate().is_err());
        Subject::Node("a".repeat(253)).validate().unwrap();
        assert!(Subject::Pattern("a b".into()).validate().is_err());
        assert!(Subject::Pattern("a=b".into()).validate().is_err());
    }

    #[test]
    fn check_reaches_each_refusal() {
        let t = token();
        let now = 1_767_225_599;
        let file = TokensFile {
            records: vec![record(
                "abcdef",
                t.secret_hash(),
                Subject::Pattern("edge-*".into()),
            )],
        };
        assert_eq!(file.check(&t, "edge-1", now).unwrap().id, "abcdef");

        let other = BootstrapToken::parse("zzzzzz.0123456789abcdef").unwrap();
        assert_eq!(
            file.check(&other, "edge-1", now).unwrap_err(),
            TokenRefusal::Unknown
        );

        let wrong = BootstrapToken::parse("abcdef.0123456789abcdee").unwrap();
        assert_eq!(
            file.check(&wrong, "edge-1", now).unwrap_err(),
            TokenRefusal::BadSecret
        );

        let mut revoked = file.clone();
        revoked.find_mut("abcdef").unwrap().revoked = true;
        assert_eq!(
            revoked.check(&t, "edge-1", now).unwrap_err(),
            TokenRefusal::Revoked
        );
        // A wrong secret is refused as such even for a revoked token.
        assert_eq!(
            revoked.check(&wrong, "edge-1", now).unwrap_err(),
            TokenRefusal::BadSecret
        );

        assert_eq!(
            file.check(&t, "edge-1", now + 1).unwrap_err(),
            TokenRefusal::Expired
        );
        assert_eq!(
            file.check(&t, "edge-1", now + 100).unwrap_err(),
            TokenRefusal::Expired
        );

        let mut used = file.clone();
        used.find_mut("abcdef").unwrap().used = 1;
        assert!(used.check(&t, "edge-1", now).is_ok());
        used.find_mut("abcdef").unwrap().used = 2;
        assert_eq!(
            used.check(&t, "edge-1", now).unwrap_err(),
            TokenRefusal::UsedUp
        );

        assert_eq!(
            file.check(&t, "core-1", now).unwrap_err(),
            TokenRefusal::NodeNotAllowed
        );
    }

    #[test]
    fn refusal_labels_and_messages() {
        use TokenRefusal::*;
        let all = [Unknown, BadSecret, Revoked, Expired, UsedUp, NodeNotAllowed];
        let labels: Vec<_> = all.iter().map(|r| r.label()).collect();
        assert_eq!(
            labels,
            [
                "unknown_token",
                "bad_secret",
                "revoked",
                "expired",
                "used_up",
                "node_not_allowed"
            ]
        );
        for r in all {
            assert!(r.to_string().contains("tunnel-certs token create"), "{r}");
        }
        assert_eq!(
            Expired.to_string(),
            "the bootstrap token has expired; create a new one with `tunnel-certs token create`"
        );
    }

    #[test]
    fn parses_the_documented_format() {
        let h1 = format!("sha256:{}", "a".repeat(64));
        let h2 = format!("sha256:{}", "0f".repeat(32));
        let text = format!(
            "# edge-tunnel bootstrap tokens: the secrets are stored only as hashes\n\
             abcdef hash={h1} node=edge-1 expires=1767225600 uses=1 used=0\n\
             \n   # indented comment\n\
             ghijkl hash={h2} pattern=store-* expires=1767225600 uses=50 used=3 revoked\n"
        );
        let file = TokensFile::parse(&text, Path::new("t")).unwrap();
        assert_eq!(
            file.records,
            vec![
                TokenRecord {
                    id: "abcdef".into(),
                    hash: h1,
                    subject: Subject::Node("edge-1".into()),
                    expires: 1_767_225_600,
                    uses: 1,
                    used: 0,
                    revoked: false,
                },
                TokenRecord {
                    id: "ghijkl".into(),
                    hash: h2,
                    subject: Subject::Pattern("store-*".into()),
                    expires: 1_767_225_600,
                    uses: 50,
                    used: 3,
                    revoked: true,
                },
            ]
        );
        // Field order does not matter.
        let text = format!("abcdef revoked used=0 uses=1 expires=5 node=n hash={HASH}");
        assert!(TokensFile::parse(&text, Path::new("t")).unwrap().records[0].revoked);
        assert_eq!(
            TokensFile::parse("", Path::new("t")).unwrap(),
            TokensFile::default()
        );
    }

    #[test]
    fn parse_errors_name_line_and_field() {
        let good = format!("abcdef hash={HASH} node=a expires=1 uses=1 used=0");
        let cases: Vec<(String, usize, &str)> = vec![
            (
                format!("# c\n{good} colour=red"),
                2,
                "unknown field \"colour\"",
            ),
            (format!("{good} shiny"), 1, "unknown field \"shiny\""),
            (
                format!("{good}\n\n{}", good.replace("node=a", "node=b")),
                3,
                "duplicate token id abcdef (first on line 1)",
            ),
            (format!("{good} pattern=a*"), 1, "both node= and pattern="),
            (good.replace(HASH, "sha256:abc"), 1, "field hash"),
            (good.replace(HASH, &HASH.to_uppercase()), 1, "field hash"),
            (good.replace("sha256:", "md5:"), 1, "field hash"),
            (good.replace("node=a", "node=a/b"), 1, "field node"),
            (
                good.replace("node=a", "pattern=a b"),
                1,
                "unknown field \"b\"",
            ),
            (
                good.replace("node=a ", ""),
                1,
                "node= or pattern= is missing",
            ),
            (good.replace(" used=0", ""), 1, "field used= is missing"),
            (
                good.replace("uses=1", "uses=0"),
                1,
                "field uses must be at least 1",
            ),
            (good.replace("uses=1", "uses=+1"), 1, "field uses"),
            (
                good.replace("expires=1", "expires=soon"),
                1,
                "field expires",
            ),
            (good.replace("used=0", "used=4294967296"), 1, "field used"),
            (
                good.replace("used=0", "used"),
                1,
                "field used needs a value",
            ),
            (
                format!("{good} revoked=yes"),
                1,
                "field revoked takes no value",
            ),
            (format!("{good} uses=2"), 1, "field uses appears twice"),
            (format!("{good} "), 1, "empty field"),
            (good.replace(' ', "  "), 1, "empty field"),
            (good.replace("abcdef", "ABCDEF"), 1, "token id \"ABCDEF\""),
            (good.replace("abcdef", "abc"), 1, "token id \"abc\""),
        ];
        for (text, line, want) in cases {
            let (got_line, detail) = parse_err(&text);
            assert_eq!(got_line, line, "{text:?}: {detail}");
            assert!(detail.contains(want), "{text:?}: {detail}");
        }
        let e = TokensFile::parse(&format!("\n{good} colour=red"), Path::new("/x/tokens"))
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("/x/tokens:2: unknown field \"colour\""),
            "{e}"
        );
    }

    #[test]
    fn size_limits() {
        let big = "#".repeat(MAX_FILE_BYTES + 1);
        assert!(matches!(
            TokensFile::parse(&big, Path::new("t")),
            Err(TokenError::TooLarge { .. })
        ));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        fs::write(&path, &big).unwrap();
        let e = TokensFile::load(&path).unwrap_err();
        assert!(matches!(e, TokenError::TooLarge { .. }), "{e}");
        let file = TokensFile {
            records: vec![
                record("abcdef", HASH.into(), Subject::Node("a".into()));
                MAX_RECORDS + 1
            ],
        };
        assert!(matches!(file.save(&path), Err(TokenError::TooLarge { .. })));
    }

    #[test]
    fn render_round_trips() {
        let mut file = TokensFile::default();
        assert_eq!(
            TokensFile::parse(&file.render(), Path::new("t")).unwrap(),
            file
        );
        assert!(file.render().starts_with("# edge-tunnel bootstrap tokens"));
        file.records.push(record(
            "abcdef",
            token().secret_hash(),
            Subject::Node("edge-1".into()),
        ));
        let mut r = record("ghijkl", HASH.into(), Subject::Pattern("store-*".into()));
        r.revoked = true;
        r.used = 2;
        file.records.push(r);
        let text = file.render();
        assert_eq!(text.lines().count(), 3);
        assert!(
            text.contains(" pattern=store-* ") && text.ends_with(" revoked\n"),
            "{text}"
        );
        assert_eq!(TokensFile::parse(&text, Path::new("t")).unwrap(), file);
    }

    proptest::proptest! {
        #[test]
        fn render_parse_round_trip(
            records in proptest::collection::vec(
                (
                    "[a-z0-9]{16}",
                    proptest::bool::ANY,
                    "[A-Za-z0-9.-]{1,40}",
                    "[A-Za-z0-9.*?-]{1,40}",
                    proptest::num::u64::ANY,
                    1..=u32::MAX,
                    proptest::num::u32::ANY,
                    proptest::bool::ANY,
                ),
                0..20,
            )
        ) {
            let mut file = TokensFile::default();
            for (i, (secret, is_node, node, pattern, expires, uses, used, revoked)) in
                records.into_iter().enumerate()
            {
                let t = BootstrapToken { id: format!("id{i:04}"), secret };
                file.records.push(TokenRecord {
                    id: t.id.clone(),
                    hash: t.secret_hash(),
                    subject: if is_node { Subject::Node(node) } else { Subject::Pattern(pattern) },
                    expires,
                    uses,
                    used,
                    revoked,
                });
            }
            let parsed = TokensFile::parse(&file.render(), Path::new("t")).unwrap();
            proptest::prop_assert_eq!(parsed, file);
        }

        #[test]
        fn glob_agrees_with_a_naive_matcher(pattern in "[ab*?]{0,8}", text in "[ab]{0,10}") {
            proptest::prop_assert_eq!(
                glob_matches(&pattern, &text),
                naive_glob(pattern.as_bytes(), text.as_bytes())
            );
        }
    }

    /// Exponential, obviously right: for the property test only.
    fn naive_glob(p: &[u8], t: &[u8]) -> bool {
        match p.split_first() {
            None => t.is_empty(),
            Some((b'*', rest)) => (0..=t.len()).any(|i| naive_glob(rest, &t[i..])),
            Some((b'?', rest)) => !t.is_empty() && naive_glob(rest, &t[1..]),
            Some((c, rest)) => t.first() == Some(c) && naive_glob(rest, &t[1..]),
        }
    }

    #[test]
    fn load_missing_and_load_or_empty() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        match TokensFile::load(&path) {
            Err(TokenError::Read { source, path: p }) => {
                assert_eq!(source.kind(), io::ErrorKind::NotFound);
                assert_eq!(p, path);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            TokensFile::load_or_empty(&path).unwrap(),
            TokensFile::default()
        );
        fs::write(&path, b"# ok\nabcdef \xff\n").unwrap();
        let e = TokensFile::load_or_empty(&path).unwrap_err();
        assert!(matches!(e, TokenError::Parse { line: 2, .. }), "{e}");
    }

    #[test]
    fn save_is_atomic_and_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        let mut file = TokensFile {
            records: vec![record(
                "abcdef",
                token().secret_hash(),
                Subject::Node("edge-1".into()),
            )],
        };
        file.save(&path).unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(TokensFile::load(&path).unwrap(), file);

        // Replacing a world-readable file leaves a private one.
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        file.find_mut("abcdef").unwrap().used = 1;
        file.save(&path).unwrap();
        assert_eq!(mode(&path), 0o600);
        assert_eq!(
            TokensFile::load(&path)
                .unwrap()
                .find("abcdef")
                .unwrap()
                .used,
            1
        );

        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, ["tokens"]);

        // A failed save leaves the old file and no temporary one: the
        // target is a directory, so the rename fails.
        let blocked = dir.path().join("blocked");
        fs::create_dir(&blocked).unwrap();
        fs::write(blocked.join("x"), "keep").unwrap();
        assert!(matches!(file.save(&blocked), Err(TokenError::Write { .. })));
        let mut names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["blocked", "tokens"]);
        assert!(TokensFile::default()
            .save(&dir.path().join("missing/tokens"))
            .is_err());
    }

    #[test]
    fn ca_cert_hash_pins_the_spki() {
        let ca = crate::issue::Ca::generate("t", 1).unwrap();
        let certs =
            crate::files::parse_certs(ca.pem().cert.as_bytes(), Path::new("ca.crt")).unwrap();
        let pin = ca_cert_hash(&certs[0]).unwrap();
        assert!(pin.starts_with("sha256:") && pin.len() == 71, "{pin}");
        assert_eq!(pin, pin.to_lowercase());

        let (_, parsed) = x509_parser::parse_x509_certificate(certs[0].as_ref()).unwrap();
        let want: [u8; 32] = Sha256::digest(parsed.public_key().raw).into();
        assert_eq!(parse_ca_cert_hash(&pin).unwrap(), want);
        assert_eq!(
            parse_ca_cert_hash(&pin.to_uppercase().replace("SHA256:", "sha256:")).unwrap(),
            want
        );

        // Another CA, another pin.
        let other = crate::issue::Ca::generate("t", 1).unwrap();
        let other = crate::files::parse_certs(other.pem().cert.as_bytes(), Path::new("o")).unwrap();
        assert_ne!(ca_cert_hash(&other[0]).unwrap(), pin);

        assert!(matches!(
            ca_cert_hash(&CertificateDer::from(vec![0x30, 0x03, 1, 2, 3])),
            Err(TokenError::BadCertificate(_))
        ));
    }

    #[test]
    fn parse_ca_cert_hash_errors() {
        let hex = "ab".repeat(32);
        assert_eq!(
            parse_ca_cert_hash(&format!("sha256:{hex}")).unwrap(),
            [0xab; 32]
        );
        let cases = [
            (hex.clone(), "does not start with sha256:"),
            (format!("sha1:{hex}"), "does not start with sha256:"),
            (format!("sha256:{}", &hex[2..]), "62 characters"),
            (format!("sha256:{hex}00"), "66 characters"),
            (format!("sha256:{}zz", &hex[2..]), "not a hex digit"),
            (format!(" sha256:{hex}"), "does not start"),
        ];
        for (input, want) in cases {
            let e = parse_ca_cert_hash(&input).unwrap_err().to_string();
            assert!(e.contains(want), "{input:?}: {e}");
            assert!(e.contains("tunnel-certs ca-hash"), "{e}");
        }
    }
}
