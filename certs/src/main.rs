//! `tunnel-certs`: issue a CA, server and agent certificates in the
//! Kubernetes Secret layout; manage bootstrap tokens for agent enrollment.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use certs::bootstrap::{self, BootstrapToken, Subject, TokenRecord, TokensFile};
use certs::files::{self, OutFile, CA_CRT, CA_KEY, TLS_CRT, TLS_KEY};
use certs::issue::Ca;
use clap::{ArgGroup, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "tunnel-certs",
    version,
    about = "Issue edge-tunnel certificates (Kubernetes Secret layout)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create a CA: DIR/ca.crt and DIR/ca.key.
    Ca {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value = "edge-tunnel CA")]
        common_name: String,
        /// Validity in days.
        #[arg(long, default_value_t = 3650)]
        days: u32,
        #[arg(long)]
        force: bool,
    },
    /// Issue a server certificate: DIR/tls.crt, DIR/tls.key, DIR/ca.crt.
    Server {
        /// Directory holding ca.crt and ca.key.
        #[arg(long)]
        ca: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// DNS name the agents dial (repeatable).
        #[arg(long = "dns")]
        dns: Vec<String>,
        /// Address the agents dial (repeatable).
        #[arg(long = "ip")]
        ips: Vec<IpAddr>,
        #[arg(long, default_value = "tunnel-server")]
        common_name: String,
        #[arg(long, default_value_t = 365)]
        days: u32,
        #[arg(long)]
        force: bool,
    },
    /// Issue an agent certificate: CN = node name, IP SANs = node addresses.
    Agent {
        #[arg(long)]
        ca: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// Kubernetes node name.
        #[arg(long)]
        node: String,
        /// Node address (InternalIP); repeatable.
        #[arg(long = "ip")]
        ips: Vec<IpAddr>,
        #[arg(long, default_value_t = 365)]
        days: u32,
        #[arg(long)]
        force: bool,
    },
    /// Issue the standalone DNAT helper's client certificate (CN
    /// edge-tunnel:dnat-helper): what a server's --feed-listen requires
    /// before it serves the agent list.
    DnatHelper {
        #[arg(long)]
        ca: PathBuf,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 365)]
        days: u32,
        #[arg(long)]
        force: bool,
    },
    /// Issue a client certificate for the mTLS CONNECT ingress (CN
    /// edge-tunnel:connect:NAME), e.g. for kube-apiserver's egress
    /// selector: what a server with --connect-client-ca accepts from the
    /// tunnel CA (agent certificates are refused there).
    ConnectClient {
        #[arg(long)]
        ca: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// Who the client is (lowercase letters, digits, '-', '.'), e.g.
        /// kube-apiserver; metrics count requests by it.
        #[arg(long)]
        name: String,
        #[arg(long, default_value_t = 365)]
        days: u32,
        #[arg(long)]
        force: bool,
    },
    /// Print a directory's tls.crt, tls.key and ca.crt as a Kubernetes
    /// Secret manifest (type kubernetes.io/tls).
    Secret {
        /// Directory in the Secret layout.
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        name: String,
        #[arg(long, default_value = "edge-tunnel")]
        namespace: String,
        /// Write the manifest to this file, mode 0600 (it holds the private
        /// key), instead of standard output. An existing file is refused
        /// unless --force.
        #[arg(long)]
        out: Option<PathBuf>,
        #[arg(long)]
        force: bool,
    },
    /// Bootstrap tokens for agent enrollment (ID.SECRET, as kubeadm's).
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Print the --ca-cert-hash pin of the CA certificate: sha256: and the
    /// hex SHA-256 of its public key (SubjectPublicKeyInfo).
    CaHash {
        /// The CA certificate, or a directory holding it as ca.crt. One
        /// line per certificate in the file.
        #[arg(long, value_name = "FILE_OR_DIR")]
        ca: PathBuf,
    },
    /// Write a CRL signed by the CA revoking the given serials and every
    /// serial an existing --out file already revokes (its number goes up
    /// by one). Give it to tunnel-server --crl: handshakes with those
    /// certificates fail and live connections are closed.
    Crl {
        /// Directory holding ca.crt and ca.key.
        #[arg(long)]
        ca: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// Serial to revoke, hex (`openssl x509 -noout -serial`); repeatable.
        #[arg(long = "revoke", value_name = "SERIAL")]
        revoke: Vec<String>,
        /// Days until the CRL's next update.
        #[arg(long, default_value_t = 30)]
        days: u32,
    },
    /// Make DIR the agent's certificate directory: created if missing,
    /// owned by UID:GID, mode 0700, the regular files in it given to the
    /// same owner (an init container runs this as root on the hostPath
    /// the kubelet created root-owned). Symlinks are refused.
    PrepareDir {
        #[arg(long)]
        dir: PathBuf,
        /// UID:GID, numeric.
        #[arg(long, value_parser = parse_owner)]
        owner: (u32, u32),
    },
}

/// `UID:GID`, both numeric.
fn parse_owner(s: &str) -> Result<(u32, u32), String> {
    let (uid, gid) = s
        .split_once(':')
        .ok_or_else(|| format!("{s:?} is not UID:GID"))?;
    let n = |v: &str| {
        v.parse::<u32>()
            .map_err(|_| format!("{v:?} in {s:?} is not a numeric id"))
    };
    Ok((n(uid)?, n(gid)?))
}

/// See [`Command::PrepareDir`].
fn prepare_dir(dir: &Path, (uid, gid): (u32, u32)) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    match std::fs::symlink_metadata(dir) {
        Ok(m) if m.file_type().is_dir() => {}
        Ok(_) => anyhow::bail!(
            "{} exists and is not a directory (symlinks are refused)",
            dir.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("cannot create {}", dir.display()))?,
        Err(e) => return Err(e).with_context(|| format!("cannot inspect {}", dir.display())),
    }
    let give = |path: &Path| -> Result<()> {
        let m = std::fs::symlink_metadata(path)?;
        if m.uid() != uid || m.gid() != gid {
            std::os::unix::fs::lchown(path, Some(uid), Some(gid))
                .with_context(|| format!("cannot give {} to {uid}:{gid}", path.display()))?;
        }
        Ok(())
    };
    // The files first, while the directory may still be root's: once it
    // is the agent's and 0700, root without DAC_OVERRIDE cannot list it
    // (which is also why a directory that is the agent's already is not
    // listed: its files are the agent's own).
    match std::fs::read_dir(dir) {
        Ok(entries) => {
            for entry in entries {
                let entry = entry?;
                if entry.file_type()?.is_file() {
                    give(&entry.path())?;
                }
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {}
        Err(e) => return Err(e).with_context(|| format!("cannot list {}", dir.display())),
    }
    give(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("cannot set mode 0700 on {}", dir.display()))?;
    eprintln!(
        "{} is ready: owned by {uid}:{gid}, mode 0700",
        dir.display()
    );
    Ok(())
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Create a token and print it (only it) on standard output; the tokens
    /// file keeps its hash. The file is created if missing.
    #[command(group(ArgGroup::new("subject").required(true).args(["node", "node_pattern"])))]
    Create {
        #[arg(long, value_name = "FILE")]
        tokens_file: PathBuf,
        /// The node the token enrolls.
        #[arg(long, value_name = "NAME")]
        node: Option<String>,
        /// The nodes the token enrolls: `*` is any run of characters, `?`
        /// one.
        #[arg(long, value_name = "GLOB")]
        node_pattern: Option<String>,
        /// How long the token is valid, 1m to 30days (e.g. 2h, 7days).
        #[arg(long, value_name = "DUR", default_value = "24h", value_parser = parse_ttl)]
        ttl: Duration,
        /// How many enrollments the token allows.
        #[arg(long, value_name = "N", default_value_t = 1,
              value_parser = clap::value_parser!(u32).range(1..))]
        uses: u32,
    },
    /// List the tokens: ID, subject, expiry, uses and state (never secrets).
    List {
        #[arg(long, value_name = "FILE")]
        tokens_file: PathBuf,
    },
    /// Revoke a token: it enrolls no more nodes.
    Revoke {
        #[arg(long, value_name = "FILE")]
        tokens_file: PathBuf,
        /// The token ID (the 6 characters before the '.').
        id: String,
    },
}

/// The shortest and longest --ttl of a token.
const MIN_TTL: Duration = Duration::from_secs(60);
const MAX_TTL: Duration = Duration::from_secs(30 * 86_400);

fn parse_ttl(s: &str) -> Result<Duration, String> {
    let ttl = humantime::parse_duration(s).map_err(|e| format!("{e} (e.g. 30m, 24h, 7days)"))?;
    if ttl < MIN_TTL || ttl > MAX_TTL {
        return Err(format!(
            "a token lives from {} to {}",
            humantime::format_duration(MIN_TTL),
            humantime::format_duration(MAX_TTL)
        ));
    }
    Ok(ttl)
}

fn unix_now() -> Result<u64> {
    Ok(SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .context("the system clock is before 1970")?
        .as_secs())
}

/// Unix seconds as RFC 3339 UTC; `@SECONDS` beyond what it can spell.
fn rfc3339(unix: u64) -> String {
    i64::try_from(unix)
        .ok()
        .and_then(|t| time::OffsetDateTime::from_unix_timestamp(t).ok())
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| format!("@{unix}"))
}

fn token_create(
    tokens_file: &Path,
    subject: Subject,
    ttl: Duration,
    uses: u32,
) -> Result<(BootstrapToken, u64)> {
    subject.validate()?;
    if let Subject::Node(node) = &subject {
        // What an agent certificate for it will need.
        certs::identity::validate_node_name(node).with_context(|| format!("--node {node:?}"))?;
    }
    let _lock = bootstrap::lock_file(tokens_file)?;
    let mut file = TokensFile::load_or_empty(tokens_file)?;
    let token = loop {
        let token = BootstrapToken::generate();
        if file.find(&token.id).is_none() {
            break token;
        }
    };
    let expires = unix_now()? + ttl.as_secs();
    file.records.push(TokenRecord {
        id: token.id.clone(),
        hash: token.secret_hash(),
        subject,
        expires,
        uses,
        used: 0,
        revoked: false,
    });
    file.save(tokens_file)?;
    Ok((token, expires))
}

/// The tokens as a table: ID, SUBJECT, EXPIRES, USES, STATE.
fn token_table(file: &TokensFile, now: u64) -> String {
    let mut rows = vec![[
        "ID".to_owned(),
        "SUBJECT".to_owned(),
        "EXPIRES".to_owned(),
        "USES".to_owned(),
        "STATE".to_owned(),
    ]];
    for r in &file.records {
        let state = if r.revoked {
            "revoked"
        } else if now >= r.expires {
            "expired"
        } else if r.used >= r.uses {
            "used up"
        } else {
            "valid"
        };
        rows.push([
            r.id.clone(),
            r.subject.to_string(),
            rfc3339(r.expires),
            format!("{}/{}", r.used, r.uses),
            state.to_owned(),
        ]);
    }
    let mut widths = [0; 5];
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let mut out = String::new();
    for row in &rows {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<width$}  ", width = widths[i]));
            }
        }
        out.push_str(&line);
        out.push('\n');
    }
    out
}

fn token_revoke(tokens_file: &Path, id: &str) -> Result<bool> {
    // A whole token pasted as the ID must not end up in an error message.
    anyhow::ensure!(
        !id.contains('.'),
        "give the token ID (the 6 characters before the '.'), not the whole token"
    );
    let _lock = bootstrap::lock_file(tokens_file)?;
    let mut file = TokensFile::load(tokens_file)?;
    let record = file.find_mut(id).with_context(|| {
        format!(
            "no bootstrap token with ID {id:?} in {}",
            tokens_file.display()
        )
    })?;
    let already = record.revoked;
    record.revoked = true;
    if !already {
        file.save(tokens_file)?;
    }
    Ok(already)
}

/// The pins of the certificates in FILE, or DIR/ca.crt.
fn ca_hashes(ca: &Path) -> Result<Vec<String>> {
    let path = if ca.is_dir() {
        ca.join(CA_CRT)
    } else {
        ca.to_owned()
    };
    files::read_certs(&path)?
        .iter()
        .map(|cert| bootstrap::ca_cert_hash(cert).with_context(|| format!("in {}", path.display())))
        .collect()
}

/// Writes `bytes` to `path` readable by its owner only (created 0600, never
/// widened from an older file's mode).
fn write_private(path: &Path, bytes: &[u8], force: bool) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if path.exists() {
        anyhow::ensure!(force, "{} exists (--force replaces it)", path.display());
        std::fs::remove_file(path).with_context(|| format!("removing {}", path.display()))?;
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing {}", path.display()))
}

/// A Secret manifest with the PEM files as stringData block scalars.
fn secret_manifest(dir: &Path, name: &str, namespace: &str) -> Result<String> {
    certs::identity::validate_node_name(name).with_context(|| format!("--name {name:?}"))?;
    certs::identity::validate_node_name(namespace)
        .with_context(|| format!("--namespace {namespace:?}"))?;
    let mut out = format!(
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: {name}\n  namespace: {namespace}\ntype: kubernetes.io/tls\nstringData:\n"
    );
    for file in [TLS_CRT, TLS_KEY, CA_CRT] {
        let bytes = files::read(&dir.join(file))?;
        let text = String::from_utf8(bytes).with_context(|| format!("{file} is not PEM text"))?;
        out.push_str(&format!("  {file}: |\n"));
        for line in text.lines() {
            out.push_str("    ");
            out.push_str(line);
            out.push('\n');
        }
    }
    Ok(out)
}

fn load_ca(dir: &Path) -> Result<Ca> {
    let cert = files::read(&dir.join(CA_CRT))?;
    let key = files::read(&dir.join(CA_KEY))?;
    let cert = String::from_utf8(cert).context("ca.crt is not UTF-8 PEM")?;
    let key = String::from_utf8(key).context("ca.key is not UTF-8 PEM")?;
    Ca::from_pem(&cert, &key).with_context(|| format!("loading the CA from {}", dir.display()))
}

fn write_leaf(out: &Path, ca: &Ca, leaf: &certs::issue::Pem, force: bool) -> Result<()> {
    files::write_leaf_dir(out, leaf, &ca.pem().cert, force)?;
    Ok(())
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Ca {
            out,
            common_name,
            days,
            force,
        } => {
            let ca = Ca::generate(&common_name, days)?;
            let pem = ca.pem();
            files::write_all(
                &out,
                &[
                    OutFile {
                        name: CA_CRT,
                        contents: &pem.cert,
                        secret: false,
                    },
                    OutFile {
                        name: CA_KEY,
                        contents: &pem.key,
                        secret: true,
                    },
                ],
                force,
            )?;
            println!("wrote {}/{{ca.crt,ca.key}}", out.display());
        }
        Command::Server {
            ca,
            out,
            dns,
            ips,
            common_name,
            days,
            force,
        } => {
            if dns.is_empty() && ips.is_empty() {
                anyhow::bail!(
                    "a server certificate needs at least one --dns or --ip that agents dial"
                );
            }
            let ca = load_ca(&ca)?;
            let leaf = ca.issue_server(&common_name, &dns, &ips, days)?;
            write_leaf(&out, &ca, &leaf, force)?;
            println!("wrote {}/{{tls.crt,tls.key,ca.crt}}", out.display());
        }
        Command::Agent {
            ca,
            out,
            node,
            ips,
            days,
            force,
        } => {
            certs::identity::validate_node_name(&node)?;
            let ca = load_ca(&ca)?;
            let leaf = ca.issue_agent(&node, &ips, days)?;
            write_leaf(&out, &ca, &leaf, force)?;
            println!(
                "wrote {}/{{tls.crt,tls.key,ca.crt}} for node {node}",
                out.display()
            );
        }
        Command::DnatHelper {
            ca,
            out,
            days,
            force,
        } => {
            let ca = load_ca(&ca)?;
            let leaf = ca.issue_dnat_helper(days)?;
            write_leaf(&out, &ca, &leaf, force)?;
            println!(
                "wrote {}/{{tls.crt,tls.key,ca.crt}} for the DNAT helper ({})",
                out.display(),
                certs::identity::DNAT_HELPER_CN
            );
        }
        Command::ConnectClient {
            ca,
            out,
            name,
            days,
            force,
        } => {
            certs::identity::validate_node_name(&name)
                .with_context(|| format!("--name {name:?}"))?;
            let ca = load_ca(&ca)?;
            let leaf = ca.issue_connect_client(&name, days)?;
            write_leaf(&out, &ca, &leaf, force)?;
            println!(
                "wrote {}/{{tls.crt,tls.key,ca.crt}} for CONNECT client {}{name}",
                out.display(),
                certs::identity::CONNECT_CLIENT_PREFIX
            );
        }
        Command::Secret {
            dir,
            name,
            namespace,
            out,
            force,
        } => {
            let manifest = secret_manifest(&dir, &name, &namespace)?;
            match out {
                None => print!("{manifest}"),
                Some(path) => write_private(&path, manifest.as_bytes(), force)?,
            }
        }
        Command::Token { command } => match command {
            TokenCommand::Create {
                tokens_file,
                node,
                node_pattern,
                ttl,
                uses,
            } => {
                let subject = match (node, node_pattern) {
                    (Some(node), _) => Subject::Node(node),
                    (None, Some(glob)) => Subject::Pattern(glob),
                    (None, None) => unreachable!("clap requires --node or --node-pattern"),
                };
                let shown = subject.clone();
                let (token, expires) = token_create(&tokens_file, subject, ttl, uses)?;
                println!("{token}");
                eprintln!(
                    "created bootstrap token {} for {shown}, valid until {} for {uses} enrollment{}; {} keeps only its hash",
                    token.id,
                    rfc3339(expires),
                    if uses == 1 { "" } else { "s" },
                    tokens_file.display()
                );
            }
            TokenCommand::List { tokens_file } => {
                let file = TokensFile::load(&tokens_file)?;
                print!("{}", token_table(&file, unix_now()?));
            }
            TokenCommand::Revoke { tokens_file, id } => {
                if token_revoke(&tokens_file, &id)? {
                    eprintln!("bootstrap token {id} was already revoked");
                } else {
                    eprintln!("revoked bootstrap token {id}");
                }
            }
        },
        Command::CaHash { ca } => {
            for hash in ca_hashes(&ca)? {
                println!("{hash}");
            }
        }
        Command::PrepareDir { dir, owner } => prepare_dir(&dir, owner)?,
        Command::Crl {
            ca,
            out,
            revoke,
            days,
        } => {
            let ca = load_ca(&ca)?;
            let mut serials: Vec<String> = Vec::new();
            let mut number = 0;
            if out.exists() {
                let pem = files::read(&out)?;
                for der in rustls_pemfile::crls(&mut &pem[..]) {
                    let der = der.with_context(|| format!("{} is not a PEM CRL", out.display()))?;
                    let info = certs::identity::crl_info(&der)?;
                    number = number.max(info.number);
                    serials.extend(info.revoked);
                }
            }
            for hex in &revoke {
                serials.push(
                    certs::identity::parse_serial(hex)
                        .map_err(|e| anyhow::anyhow!("--revoke: {e}"))?,
                );
            }
            serials.sort();
            serials.dedup();
            let raw: Vec<Vec<u8>> = serials
                .iter()
                .map(|h| certs::identity::serial_bytes(h))
                .collect();
            let pem = ca.crl(&raw, number + 1, days)?;
            files::write_atomic(&out, pem.as_bytes(), 0o644)?;
            eprintln!(
                "wrote {}: CRL number {} revoking {} certificate(s)",
                out.display(),
                number + 1,
                serials.len()
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;
    use std::os::unix::fs::PermissionsExt;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("tunnel-certs").chain(args.iter().copied()))
    }

    fn create_args(extra: &[&str]) -> Result<TokenCommand, clap::Error> {
        let mut args = vec!["token", "create", "--tokens-file", "t"];
        args.extend_from_slice(extra);
        match parse(&args)?.command {
            Command::Token { command } => Ok(command),
            _ => unreachable!(),
        }
    }

    #[test]
    fn cli_definition_is_valid() {
        Cli::command().debug_assert();
    }

    #[test]
    fn prepare_dir_creates_and_refuses_symlinks() {
        use std::os::unix::fs::MetadataExt;
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("pki");
        let me = (
            std::fs::metadata(tmp.path()).unwrap().uid(),
            std::fs::metadata(tmp.path()).unwrap().gid(),
        );
        prepare_dir(&dir, me).unwrap();
        let m = std::fs::metadata(&dir).unwrap();
        assert_eq!(m.permissions().mode() & 0o777, 0o700);
        std::fs::write(dir.join("tls.key"), "k").unwrap();
        prepare_dir(&dir, me).unwrap();
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&dir, &link).unwrap();
        let err = prepare_dir(&link, me).unwrap_err().to_string();
        assert!(err.contains("not a directory"), "{err}");
        assert!(parse_owner("65532:65532").is_ok());
        assert!(parse_owner("nobody:65532").is_err());
        assert!(parse_owner("65532").is_err());
    }

    #[test]
    fn create_needs_one_subject_and_checks_ttl_and_uses() {
        let Ok(TokenCommand::Create {
            node, ttl, uses, ..
        }) = create_args(&["--node", "edge-1"])
        else {
            panic!("create did not parse");
        };
        assert_eq!(node.as_deref(), Some("edge-1"));
        assert_eq!(ttl, Duration::from_secs(86_400));
        assert_eq!(uses, 1);
        assert!(create_args(&[]).is_err());
        assert!(create_args(&["--node", "a", "--node-pattern", "a*"]).is_err());
        assert!(create_args(&["--node-pattern", "a*", "--uses", "50"]).is_ok());
        assert!(create_args(&["--node", "a", "--uses", "0"]).is_err());
        for ok in ["1m", "2h", "30days", "7d"] {
            assert!(create_args(&["--node", "a", "--ttl", ok]).is_ok(), "{ok}");
        }
        for bad in ["59s", "31days", "0s", "soon", "-1h"] {
            let e = create_args(&["--node", "a", &format!("--ttl={bad}")])
                .err()
                .unwrap()
                .to_string();
            assert!(e.contains("--ttl"), "{bad}: {e}");
        }
        let e = parse_ttl("5s").unwrap_err();
        assert_eq!(e, "a token lives from 1m to 30days");
    }

    #[test]
    fn create_list_revoke() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        let day = Duration::from_secs(86_400);
        let (a, expires) = token_create(&path, Subject::Node("edge-1".into()), day, 1).unwrap();
        let now = unix_now().unwrap();
        assert!((now + 86_399..=now + 86_400).contains(&expires));
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let (b, _) = token_create(&path, Subject::Pattern("store-*".into()), day * 7, 50).unwrap();
        assert_ne!(a.id, b.id);

        let file = TokensFile::load(&path).unwrap();
        assert_eq!(file.records.len(), 2);
        assert_eq!(file.check(&a, "edge-1", now).unwrap().expires, expires);
        assert!(file.check(&b, "store-9", now).is_ok());
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(!text.contains(&a.secret) && !text.contains(&b.secret));

        let table = token_table(&file, now);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 3, "{table}");
        assert!(lines[0].starts_with("ID      SUBJECT"), "{table}");
        assert!(lines[0].ends_with("USES  STATE"), "{table}");
        assert!(
            lines[1].starts_with(&format!("{}  node=edge-1 ", a.id)),
            "{table}"
        );
        assert!(lines[1].contains(&rfc3339(expires)) && lines[1].ends_with(" 0/1   valid"));
        assert!(lines[2].contains("pattern=store-*") && lines[2].ends_with("0/50  valid"));
        assert!(
            !table.contains(&a.secret) && !table.contains("sha256:"),
            "{table}"
        );

        assert!(!token_revoke(&path, &a.id).unwrap());
        assert!(token_revoke(&path, &a.id).unwrap());
        let file = TokensFile::load(&path).unwrap();
        assert_eq!(
            file.check(&a, "edge-1", now).unwrap_err(),
            bootstrap::TokenRefusal::Revoked
        );
        assert!(file.check(&b, "store-9", now).is_ok());
        let table = token_table(&file, now);
        assert!(
            table.lines().nth(1).unwrap().ends_with(" revoked"),
            "{table}"
        );
        assert!(
            token_table(&file, expires + 7 * 86_400).ends_with(" expired\n"),
            "{table}"
        );

        let e = token_revoke(&path, "zzzzzz").unwrap_err().to_string();
        assert!(e.contains("\"zzzzzz\"") && e.contains("tokens"), "{e}");
        let e = token_revoke(&path, &b.to_string()).unwrap_err().to_string();
        assert!(!e.contains(&b.secret), "{e}");
        let e = format!(
            "{:#}",
            token_revoke(&dir.path().join("none"), "abcdef").unwrap_err()
        );
        assert!(e.contains("none"), "{e}");
    }

    #[test]
    fn table_states() {
        let mut file = TokensFile::default();
        for (id, used, revoked) in [
            ("aaaaaa", 0, false),
            ("bbbbbb", 2, false),
            ("cccccc", 2, true),
        ] {
            file.records.push(TokenRecord {
                id: id.into(),
                hash: String::new(),
                subject: Subject::Node("n".into()),
                expires: 100,
                uses: 2,
                used,
                revoked,
            });
        }
        let states: Vec<String> = token_table(&file, 99)
            .lines()
            .skip(1)
            .map(|l| l.rsplit("  ").next().unwrap().trim().to_owned())
            .collect();
        assert_eq!(states, ["valid", "used up", "revoked"]);
        let states: Vec<String> = token_table(&file, 100)
            .lines()
            .skip(1)
            .map(|l| l.rsplit("  ").next().unwrap().trim().to_owned())
            .collect();
        assert_eq!(states, ["expired", "expired", "revoked"]);
        assert_eq!(token_table(&TokensFile::default(), 0).lines().count(), 1);
    }

    #[test]
    fn create_refuses_bad_subjects() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens");
        let day = Duration::from_secs(86_400);
        for subject in [
            Subject::Node("Edge-1".into()),
            Subject::Node("edge_1".into()),
            Subject::Node(String::new()),
            Subject::Pattern("store/*".into()),
        ] {
            assert!(
                token_create(&path, subject.clone(), day, 1).is_err(),
                "{subject}"
            );
        }
        assert!(!path.exists());
    }

    #[test]
    fn rfc3339_utc() {
        assert_eq!(rfc3339(1_767_225_600), "2026-01-01T00:00:00Z");
        assert_eq!(rfc3339(u64::MAX), format!("@{}", u64::MAX));
    }

    #[test]
    fn ca_hash_of_file_and_dir() {
        let dir = tempfile::tempdir().unwrap();
        let (one, two) = (
            Ca::generate("one", 1).unwrap().pem().cert,
            Ca::generate("two", 1).unwrap().pem().cert,
        );
        std::fs::write(dir.path().join(CA_CRT), &one).unwrap();
        let from_dir = ca_hashes(dir.path()).unwrap();
        assert_eq!(from_dir.len(), 1);
        assert_eq!(ca_hashes(&dir.path().join(CA_CRT)).unwrap(), from_dir);
        let both = dir.path().join("both.crt");
        std::fs::write(&both, format!("{one}{two}")).unwrap();
        let hashes = ca_hashes(&both).unwrap();
        assert_eq!(hashes.len(), 2);
        assert_eq!(hashes[0], from_dir[0]);
        assert_ne!(hashes[0], hashes[1]);
        assert!(bootstrap::parse_ca_cert_hash(&hashes[1]).is_ok());
        assert!(ca_hashes(&dir.path().join("missing")).is_err());
    }
}
