//! End-to-end tests across a real NAT (network namespaces), with the real
//! binaries: tunnel-server with its DNAT helper in `cloud`, tunnel-agent
//! behind the NAT in `edge`. Need root; under CI=true a missing capability
//! fails instead of skipping (`e2e::netns::available`).
//!
//! One test binary, one module per area; the harness (topology, the
//! tunnel across it, curl and friends) is `e2e::netns` in the library.

mod burst;
mod dnat;
mod drain;
mod egress;
mod fallback;
mod kubelet;
mod nat;
mod outage;
mod prometheus;
mod redirect;
