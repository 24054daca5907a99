//! Transparent ingress for connections that iptables DNAT redirected here.
//!
//! The original destination (SO_ORIGINAL_DST) names the edge address and
//! port the client wanted. A connection no live agent can serve, or whose
//! dial fails, is reset at once: the client sees exactly what a refused
//! TCP connection looks like, never a hang. So is a connection from a
//! client over `--max-streams-per-client`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};

use crate::dial::{self, DialMode, Target};
use crate::ingress;
use crate::Shared;

pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    ingress::watch_clients(&listener);
    let local = listener.local_addr().ok();
    loop {
        let slot = shared.client_slots.acquire(&shared.metrics).await;
        let (tcp, peer) = transport::net::accept_with(&listener, "transparent", |_| {
            shared.metrics.accept_failed("transparent")
        })
        .await;
        let claim = match shared.client_slots.claim(peer.ip(), "transparent") {
            Ok(claim) => claim,
            Err(busy) => {
                crate::ingress::client_busy(&shared, &busy, "transparent");
                reset(tcp);
                continue;
            }
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let _slot = (slot, claim);
            handle(tcp, peer, local, shared).await
        });
    }
}

async fn handle(tcp: TcpStream, peer: SocketAddr, local: Option<SocketAddr>, shared: Arc<Shared>) {
    let found = tcp
        .local_addr()
        .and_then(|here| Ok((here, transport::net::original_dst(&tcp, here)?)));
    let (here, original) = match found {
        Ok(found) => found,
        Err(e) => {
            tracing::info!(%peer, "no original destination (not a DNAT-redirected connection?): {e}");
            shared.metrics.dial_failed("no_original_destination");
            return reset(tcp);
        }
    };
    // Without a DNAT rule the "original" destination is this listener.
    if Some(original) == local || here == original {
        tracing::info!(%peer, "connection was not redirected by DNAT; refusing");
        shared.metrics.dial_failed("not_redirected");
        return reset(tcp);
    }
    let target = Target::Address(original);
    match dial::dial(&shared, &target, DialMode::Optimistic).await {
        Ok(dialed) => {
            // The DNAT rule admitted it: nothing to revoke.
            let standing = crate::proxy_auth::Credential::Standing;
            ingress::relay(
                shared,
                dialed,
                tcp,
                Some(peer.ip()),
                "transparent",
                standing,
            )
            .await
        }
        Err(e) => {
            tracing::info!(%peer, %target, "transparent connection refused: {e}");
            reset(tcp)
        }
    }
}

/// Closes with an RST, as a refused connection would look.
fn reset(tcp: TcpStream) {
    let _ = socket2::SockRef::from(&tcp).set_linger(Some(Duration::ZERO));
    drop(tcp);
}
