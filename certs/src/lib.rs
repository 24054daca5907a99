//! Certificates for edge-tunnel.
//!
//! Layout:
//! - [`issue`]: a CA and the leaf certificates it signs (rcgen). Agent
//!   certificates carry the node name as CN and the node's addresses as IP
//!   SANs; that is the agent's identity, not anything it says on the wire.
//! - [`files`]: reading and writing the Kubernetes Secret layout
//!   (`tls.crt`, `tls.key`, `ca.crt`), keys written 0600, no silent overwrite.
//! - [`identity`]: the node identity read back out of a peer certificate.
//! - [`tls`]: rustls configurations for both ends: TLS 1.3 only, client
//!   certificates required and verified against `ca.crt`.
//! - [`bootstrap`]: bootstrap tokens (`ID.SECRET`) for agent enrollment,
//!   the tokens file that keeps their hashes, and the `sha256:` pin of a
//!   CA certificate an enrolling agent checks.
#![forbid(unsafe_code)]

pub mod bootstrap;
pub mod files;
pub mod identity;
pub mod issue;
pub mod tls;

pub use files::{CertDir, CertError};
pub use identity::{Identity, IdentityError};
