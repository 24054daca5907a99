//! Throw-away certificates for tests, written in the Secret layout.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use certs::files;
use certs::issue::{Ca, Pem};

/// A CA with a server certificate for 127.0.0.1 / localhost, and agent
/// certificates issued on demand.
pub struct Pki {
    pub dir: tempfile::TempDir,
    pub ca: Ca,
}

impl Pki {
    pub fn new() -> Pki {
        Self::with_server_ips(&["127.0.0.1".parse().unwrap()])
    }

    pub fn with_server_ips(ips: &[IpAddr]) -> Pki {
        Self::with_server_names(&["localhost".into()], ips)
    }

    /// A server certificate for these DNS names and addresses.
    pub fn with_server_names(dns: &[String], ips: &[IpAddr]) -> Pki {
        let dir = tempfile::Builder::new()
            .prefix("edge-tunnel-pki")
            .tempdir()
            .unwrap();
        let ca = Ca::generate("test CA", 1).unwrap();
        let pki = Pki { dir, ca };
        let server = pki.ca.issue_server("tunnel-server", dns, ips, 1).unwrap();
        pki.write(&pki.server_dir(), &server);
        pki
    }

    pub fn server_dir(&self) -> PathBuf {
        self.dir.path().join("server")
    }

    pub fn agent_dir(&self, node: &str) -> PathBuf {
        self.dir.path().join("agents").join(node)
    }

    /// Issues `node`'s certificate with `ips` (replacing any earlier one).
    pub fn issue_agent(&self, node: &str, ips: &[IpAddr]) -> PathBuf {
        let pem = self.ca.issue_agent(node, ips, 1).unwrap();
        let dir = self.agent_dir(node);
        self.write(&dir, &pem);
        dir
    }

    /// Where [`Pki::issue_dnat_helper`] writes.
    pub fn dnat_helper_dir(&self) -> PathBuf {
        self.dir.path().join("dnat-helper")
    }

    /// Issues the standalone DNAT helper's client certificate.
    pub fn issue_dnat_helper(&self) -> PathBuf {
        let pem = self.ca.issue_dnat_helper(1).unwrap();
        let dir = self.dnat_helper_dir();
        self.write(&dir, &pem);
        dir
    }

    /// Issues a CONNECT client certificate (`tunnel-certs connect-client
    /// --name NAME`).
    pub fn issue_connect_client(&self, name: &str) -> PathBuf {
        let pem = self.ca.issue_connect_client(name, 1).unwrap();
        let dir = self.dir.path().join("connect-clients").join(name);
        self.write(&dir, &pem);
        dir
    }

    fn write(&self, dir: &Path, leaf: &Pem) {
        files::write_leaf_dir(dir, leaf, &self.ca.pem().cert, true).unwrap();
    }
}

impl Default for Pki {
    fn default() -> Self {
        Self::new()
    }
}
