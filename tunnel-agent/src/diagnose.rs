//! Turning what failed during a connection attempt into a
//! [`FailureKind`] the selector decides on, and a message that says which
//! side rejected what.

use crate::selector::FailureKind;

/// Classifies a QUIC connection error met while connecting or
/// registering. In TLS 1.3 the client finishes its handshake before the
/// server has checked the client certificate, so a rejected certificate
/// shows up as a close after the handshake.
pub fn quic(e: &quinn::ConnectionError) -> (FailureKind, String) {
    use quinn::ConnectionError as E;
    match e {
        E::ConnectionClosed(c) if is_tls_alert(c.error_code) => (
            FailureKind::Tls,
            format!("the server rejected this agent's certificate ({e}); check that tls.crt is signed by the CA the server trusts"),
        ),
        E::TransportError(t) if is_tls_alert(t.code) => (
            FailureKind::Tls,
            format!("this agent did not accept the server's certificate ({e}); check ca.crt and --server-name"),
        ),
        E::TimedOut => (FailureKind::Timeout, e.to_string()),
        E::ApplicationClosed(_) | E::Reset => (
            FailureKind::Refused,
            format!("the server closed the connection: {e}"),
        ),
        E::ConnectionClosed(_) | E::VersionMismatch | E::TransportError(_) => {
            (FailureKind::Protocol, e.to_string())
        }
        E::LocallyClosed | E::CidsExhausted => (FailureKind::Local, e.to_string()),
    }
}

/// QUIC carries TLS alerts as transport error codes 0x100-0x1ff.
fn is_tls_alert(code: quinn::TransportErrorCode) -> bool {
    (0x100..0x200).contains(&u64::from(code))
}

/// Classifies an I/O error of the TCP connect or the TLS handshake of the
/// HTTP/2 transport, saying which side refused the TLS handshake when
/// the error tells.
pub fn tls_io(e: &std::io::Error) -> (FailureKind, String) {
    match e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()) {
        Some(rustls::Error::AlertReceived(alert)) => (
            FailureKind::Tls,
            format!("the server rejected this agent's certificate (TLS alert {alert:?}); check that tls.crt is signed by the CA the server trusts"),
        ),
        Some(rustls::Error::InvalidCertificate(why)) => (
            FailureKind::Tls,
            format!("this agent did not accept the server's certificate ({why:?}); check ca.crt and --server-name"),
        ),
        Some(other) => (FailureKind::Tls, format!("TLS: {other}")),
        None => (FailureKind::Unreachable, format!("TLS: {e}")),
    }
}

/// Classifies a failed TCP connect.
pub fn tcp_connect(e: &std::io::Error) -> (FailureKind, String) {
    let kind = match e.kind() {
        std::io::ErrorKind::TimedOut => FailureKind::Timeout,
        _ => FailureKind::Unreachable,
    };
    (kind, format!("TCP connect: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_refused_is_unreachable_and_says_tcp() {
        let e = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let (kind, detail) = tcp_connect(&e);
        assert_eq!(kind, FailureKind::Unreachable);
        assert!(detail.starts_with("TCP connect"), "{detail}");
    }

    #[test]
    fn a_received_alert_blames_our_certificate() {
        let e = std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::AlertReceived(rustls::AlertDescription::BadCertificate),
        );
        let (kind, detail) = tls_io(&e);
        assert_eq!(kind, FailureKind::Tls);
        assert!(
            detail.contains("rejected this agent's certificate"),
            "{detail}"
        );
    }

    #[test]
    fn application_close_during_registration_is_a_refusal() {
        let (kind, _) = quic(&quinn::ConnectionError::Reset);
        assert_eq!(kind, FailureKind::Refused);
        let (kind, _) = quic(&quinn::ConnectionError::TimedOut);
        assert_eq!(kind, FailureKind::Timeout);
    }
}
