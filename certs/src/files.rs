//! The Kubernetes Secret layout on disk: `tls.crt`, `tls.key`, `ca.crt`
//! (and `ca.key` for a CA directory).

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rustls::pki_types::{CertificateDer, PrivateKeyDer};

pub const TLS_CRT: &str = "tls.crt";
pub const TLS_KEY: &str = "tls.key";
pub const CA_CRT: &str = "ca.crt";
pub const CA_KEY: &str = "ca.key";

/// Why certificate files could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("cannot read {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
    #[error("{path} exists; pass --force to overwrite it")]
    Exists { path: PathBuf },
    #[error("{path} holds no PEM certificate")]
    NoCertificate { path: PathBuf },
    #[error("{path} holds no PEM private key (PKCS#8, PKCS#1 or SEC1)")]
    NoKey { path: PathBuf },
    #[error("{path} is not valid PEM: {source}")]
    BadPem { path: PathBuf, source: io::Error },
}

/// A loaded certificate directory: our chain and key, and the CA we trust
/// for the peer.
#[derive(Debug)]
pub struct CertDir {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub ca: Vec<CertificateDer<'static>>,
}

impl CertDir {
    /// Reads `tls.crt`, `tls.key` and `ca.crt` from `dir`.
    pub fn load(dir: &Path) -> Result<CertDir, CertError> {
        Ok(CertDir {
            chain: read_certs(&dir.join(TLS_CRT))?,
            key: read_key(&dir.join(TLS_KEY))?,
            ca: read_certs(&dir.join(CA_CRT))?,
        })
    }

    /// Our own leaf certificate.
    pub fn leaf(&self) -> &CertificateDer<'static> {
        &self.chain[0]
    }
}

/// Reads a file, naming it in the error.
pub fn read(path: &Path) -> Result<Vec<u8>, CertError> {
    fs::read(path).map_err(|source| CertError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Reads every PEM certificate in `path`; at least one must be there.
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, CertError> {
    parse_certs(&read(path)?, path)
}

/// Parses every PEM certificate in `pem`; `path` names the source in errors.
pub fn parse_certs(pem: &[u8], path: &Path) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let certs = rustls_pemfile::certs(&mut &pem[..])
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| CertError::BadPem {
            path: path.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(CertError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// Reads the first PEM private key in `path`.
pub fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, CertError> {
    parse_key(&read(path)?, path)
}

/// Parses the first PEM private key in `pem`; `path` names the source in errors.
pub fn parse_key(pem: &[u8], path: &Path) -> Result<PrivateKeyDer<'static>, CertError> {
    rustls_pemfile::private_key(&mut &pem[..])
        .map_err(|source| CertError::BadPem {
            path: path.to_owned(),
            source,
        })?
        .ok_or_else(|| CertError::NoKey {
            path: path.to_owned(),
        })
}

/// One file to write: name, contents, and whether it is secret (0600).
pub struct OutFile<'a> {
    pub name: &'static str,
    pub contents: &'a str,
    pub secret: bool,
}

/// Writes `files` into `dir` (created if missing). Without `force`, refuses
/// before writing anything if any of them exists.
pub fn write_all(dir: &Path, files: &[OutFile<'_>], force: bool) -> Result<(), CertError> {
    fs::create_dir_all(dir).map_err(|source| CertError::Write {
        path: dir.to_owned(),
        source,
    })?;
    if !force {
        for f in files {
            let path = dir.join(f.name);
            if path.exists() {
                return Err(CertError::Exists { path });
            }
        }
    }
    for f in files {
        let path = dir.join(f.name);
        let mode = if f.secret { 0o600 } else { 0o644 };
        // Remove first so a forced rewrite never inherits a wider mode.
        if force {
            let _ = fs::remove_file(&path);
        }
        let result = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&path)
            .and_then(|mut file| {
                file.write_all(f.contents.as_bytes())?;
                file.sync_all()
            });
        result.map_err(|source| CertError::Write { path, source })?;
    }
    Ok(())
}

/// Writes a leaf in the Secret layout: `tls.crt`, `tls.key` (0600) and the
/// CA certificate as `ca.crt`.
pub fn write_leaf_dir(
    dir: &Path,
    leaf: &crate::issue::Pem,
    ca_cert: &str,
    force: bool,
) -> Result<(), CertError> {
    write_all(
        dir,
        &[
            OutFile {
                name: TLS_CRT,
                contents: &leaf.cert,
                secret: false,
            },
            OutFile {
                name: TLS_KEY,
                contents: &leaf.key,
                secret: true,
            },
            OutFile {
                name: CA_CRT,
                contents: ca_cert,
                secret: false,
            },
        ],
        force,
    )
}

/// Replaces `path` with `contents` atomically: a temporary file in the
/// same directory, created with `mode`, written and synced, then renamed
/// over `path` (and the directory synced). A reader sees the old file or
/// the new one, never a part; a crash leaves the old one.
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<(), CertError> {
    let fail = |source| CertError::Write {
        path: path.to_owned(),
        source,
    };
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| fail(io::Error::new(io::ErrorKind::InvalidInput, "no file name")))?;
    // A name no other writer uses: this process, a counter, the clock.
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let mut attempt = 0;
    let (tmp, file) = loop {
        let tmp = dir.join(format!(
            ".{}.tmp-{}-{}-{}",
            name.to_string_lossy(),
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos())
        ));
        match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
        {
            Ok(file) => break (tmp, file),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempt < 8 => attempt += 1,
            Err(e) => return Err(fail(e)),
        }
    };
    let written = (|| {
        let mut file = file;
        file.write_all(contents)?;
        file.sync_all()?;
        drop(file);
        fs::rename(&tmp, path)
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(fail(e));
    }
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}
