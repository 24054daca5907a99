//! `tunnel-certs`: issue a CA, server and agent certificates in the
//! Kubernetes Secret layout.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use certs::files::{self, OutFile, CA_CRT, CA_KEY, TLS_CRT, TLS_KEY};
use certs::issue::Ca;
use clap::{Parser, Subcommand};

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
    }
    Ok(())
}
