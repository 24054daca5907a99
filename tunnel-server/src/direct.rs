//! Destinations no agent serves (`--direct-cidr`): the server dials them
//! itself, as Konnectivity's default route does, so a kube-apiserver whose
//! whole `cluster` egress goes through the ingress still reaches admission
//! webhooks, aggregated APIs (metrics.k8s.io) and services in the cloud.
//!
//! Only when no agent holds the target (an agent's node always wins), and
//! only to addresses inside the configured ranges: a node name no agent
//! serves is resolved (within the dial timeout) and dialed only if it
//! resolves into a range, so `webhook.ns.svc:443` works from a server pod
//! with cluster DNS. Loopback, unspecified and multicast addresses, and
//! the addresses of the server's own interfaces (its pod address, which a
//! `--direct-cidr` of the pod range contains), are never dialed, whatever
//! the ranges say: the server's own admin port and sockets stay out of
//! reach. Everything else keeps the fast 503. Off by default.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;

use crate::dial::{self, DialError, DialMode, Dialed, Target};
use crate::dnat::rules::Prefix;
use crate::proxy_auth::Credential;
use crate::Shared;

/// Where a routed request goes.
pub enum Upstream {
    /// A stream to the agent that serves the target.
    Tunnel(Dialed),
    /// A TCP connection the server opened itself (`--direct-cidr`).
    Direct {
        stream: TcpStream,
        target: SocketAddr,
    },
}

/// Dials `target` through its agent, or directly when no agent serves it
/// and it lies in `--direct-cidr`.
pub async fn dial(
    shared: &Arc<Shared>,
    target: &Target,
    mode: DialMode,
) -> Result<Upstream, DialError> {
    let ranges = &shared.config.direct_cidrs;
    if ranges.is_empty()
        || !matches!(
            dial::route(&shared.registry, target),
            Err(DialError::NoAgent(_))
        )
    {
        return dial::dial(shared, target, mode).await.map(Upstream::Tunnel);
    }
    let timeout = shared.config.dial_timeout;
    let result = tokio::time::timeout(timeout, connect(target, ranges)).await;
    let result = match result {
        Ok(r) => r,
        Err(_) => Err(DialError::DirectTimeout {
            target: target.to_string(),
            after: timeout,
        }),
    };
    let label = match &result {
        Ok(_) => "ok",
        Err(e) => e.label(),
    };
    shared
        .metrics
        .direct_dials
        .get_or_create(&[("result", label)])
        .inc();
    let (stream, addr) = result?;
    let _ = stream.set_nodelay(true);
    crate::ingress::watch_client(&stream);
    Ok(Upstream::Direct {
        stream,
        target: addr,
    })
}

/// Whether the server may dial `ip` itself; `own`: the addresses of its
/// own interfaces ([`crate::addresses::own_addresses`]).
pub fn dialable(ip: IpAddr, ranges: &[Prefix], own: &BTreeSet<IpAddr>) -> bool {
    let ip = transport::net::canonical_ip(ip);
    !ip.is_loopback()
        && !ip.is_unspecified()
        && !ip.is_multicast()
        && ip != IpAddr::V4(std::net::Ipv4Addr::BROADCAST)
        && !own.contains(&ip)
        && ranges.iter().any(|r| r.contains(ip))
}

async fn connect(target: &Target, ranges: &[Prefix]) -> Result<(TcpStream, SocketAddr), DialError> {
    let candidates: Vec<SocketAddr> = match target {
        Target::Address(addr) => vec![*addr],
        Target::Node { name, port } => tokio::net::lookup_host((name.as_str(), *port))
            .await
            .map_err(|e| {
                DialError::NoAgent(format!(
                    "{target} (nor can it be resolved to dial it directly: {e})"
                ))
            })?
            .collect(),
    };
    // Read per dial (one netlink dump): direct dials are rare (webhooks,
    // aggregated APIs), and a pod's addresses can change.
    let own: BTreeSet<IpAddr> = crate::addresses::own_addresses()
        .into_iter()
        .map(transport::net::canonical_ip)
        .collect();
    let inside: Vec<SocketAddr> = candidates
        .into_iter()
        .filter(|a| dialable(a.ip(), ranges, &own))
        .collect();
    if inside.is_empty() {
        return Err(DialError::NoAgent(format!(
            "{target} (and it is not in --direct-cidr, or is the server's own address)"
        )));
    }
    let mut last = None;
    for addr in inside {
        match TcpStream::connect(addr).await {
            Ok(stream) => return Ok((stream, addr)),
            Err(e) => last = Some((addr, e)),
        }
    }
    let (target, source) = last.expect("at least one address was tried");
    Err(DialError::Direct { target, source })
}

/// The bound on a direct relay's buffers: one per direction.
const DIRECT_BUFFER: usize = 16 * 1024;

/// Relays a client's socket to a directly dialed connection until both
/// sides are done, or until `credential` is revoked (both are reset);
/// `early` is what the client sent behind its request head. Counted as
/// the `direct` ingress.
pub async fn relay<C>(
    shared: &Arc<Shared>,
    mut client: C,
    mut upstream: TcpStream,
    early: &[u8],
    credential: Credential,
) where
    C: tokio::io::AsyncRead + tokio::io::AsyncWrite + transport::ClientSocket + Unpin,
{
    use tokio::io::AsyncWriteExt;
    let metrics = &shared.metrics;
    metrics
        .streams
        .get_or_create(&[("ingress", "direct")])
        .inc();
    metrics.streams_active.inc();
    let copy = async {
        if !early.is_empty() {
            upstream.write_all(early).await?;
        }
        tokio::io::copy_bidirectional_with_sizes(
            &mut client,
            &mut upstream,
            DIRECT_BUFFER,
            DIRECT_BUFFER,
        )
        .await
    };
    let revocation = credential.watch(shared);
    let result = tokio::select! {
        r = copy => r.map_err(|e| e.to_string()),
        () = crate::proxy_auth::revoked(revocation.as_ref()) => {
            let why = revocation.as_ref().map_or("revoked", |r| r.reason());
            tracing::warn!("{why}; the direct connection was reset");
            client.abort_on_close();
            Err(why.to_owned())
        }
    };
    match result {
        Ok((up, down)) => tracing::debug!(up, down, "direct connection ended"),
        Err(e) => {
            tracing::debug!("direct connection failed: {e}");
            let _ = socket2::SockRef::from(&upstream).set_linger(Some(Duration::ZERO));
        }
    }
    metrics.streams_active.dec();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_addresses_in_range_and_never_loopback() {
        let ranges: Vec<Prefix> = ["10.96.0.0/12", "0.0.0.0/0"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let none = BTreeSet::new();
        assert!(dialable(ip("10.96.0.10"), &ranges[..1], &none));
        assert!(!dialable(ip("10.112.0.1"), &ranges[..1], &none));
        assert!(dialable(ip("::ffff:10.96.0.10"), &ranges[..1], &none));
        // Even 0.0.0.0/0 does not reach the server's own sockets.
        for never in ["127.0.0.1", "0.0.0.0", "224.0.0.1", "255.255.255.255"] {
            assert!(!dialable(ip(never), &ranges, &none), "{never}");
        }
        assert!(!dialable(ip("::1"), &["::/0".parse().unwrap()], &none));
    }

    #[test]
    fn never_the_servers_own_interface_addresses() {
        // A --direct-cidr of the pod range contains the server's own pod
        // address, where its admin port listens.
        let pods: Vec<Prefix> = vec!["10.244.0.0/16".parse().unwrap()];
        let own: BTreeSet<IpAddr> = [IpAddr::from([10, 244, 1, 7])].into();
        assert!(!dialable("10.244.1.7".parse().unwrap(), &pods, &own));
        assert!(!dialable("::ffff:10.244.1.7".parse().unwrap(), &pods, &own));
        assert!(dialable("10.244.1.8".parse().unwrap(), &pods, &own));
        // And what this host has now, whatever it is.
        let everywhere: Vec<Prefix> = vec!["0.0.0.0/0".parse().unwrap(), "::/0".parse().unwrap()];
        let host: BTreeSet<IpAddr> = crate::addresses::own_addresses()
            .into_iter()
            .map(transport::net::canonical_ip)
            .collect();
        for ip in &host {
            assert!(!dialable(*ip, &everywhere, &host), "{ip}");
        }
    }
}
