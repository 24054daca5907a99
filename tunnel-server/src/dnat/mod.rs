//! The DNAT helper: iptables rules that send kube-apiserver → kubelet
//! traffic (and Prometheus → exporter traffic) into the transparent ingress.
//!
//! It owns one nat chain, [`CHAIN`], jumped to from `OUTPUT` (host processes
//! such as kube-apiserver) and `PREROUTING` (pods such as Prometheus) for
//! TCP to the redirected ports only, with one DNAT rule per (edge address,
//! port) and per (static CIDR, port).
//!
//! - [`rules`]: rendering the desired rules and diffing them against what
//!   `iptables-save` shows (pure, unit-tested).
//! - [`iptables`]: back-end detection (nf_tables or legacy), atomic apply
//!   with `iptables-restore --noflush`, cleanup, the CAP_NET_ADMIN check.
//! - [`conntrack`]: deleting the conntrack entries a rule change made
//!   stale (the `conntrack` tool), counted.
//! - [`agent_list`]: the standalone helper's source of addresses, a
//!   server's agent feed (`--feed-listen`) read over mutually
//!   authenticated TLS with hyper's HTTP/1.1 client.
//! - [`metrics`]: the helper's counters.
//! - [`reconciler`]: applies the registry's addresses on every change and
//!   periodically (to repair drift), and removes everything on shutdown.

pub mod agent_list;
pub mod conntrack;
pub mod iptables;
pub mod metrics;
pub mod reconciler;
pub mod remembered;
pub mod rules;

/// The chain this helper owns in the nat table.
pub const CHAIN: &str = "TUNNEL-DNAT";
