//! Which address a request really comes from. Only trusted proxies may speak for someone else
//! through `X-Forwarded-For`; everyone else is taken to be the TCP peer, so a client cannot pick
//! the address that rate limits, risk scoring and the audit trail see.

use std::net::{IpAddr, SocketAddr};

use http::HeaderMap;
use ipnet::IpNet;

use super::headers::X_FORWARDED_FOR;

/// Whether an address is inside any of the trusted networks. IPv4-mapped IPv6 addresses
/// (`::ffff:10.0.0.1`, as dual-stack sockets report IPv4 peers) are compared as IPv4.
pub fn is_trusted(ip: IpAddr, trusted: &[IpNet]) -> bool {
    let ip = ip.to_canonical();
    trusted.iter().any(|net| net.contains(&ip))
}

/// The client's IP: `peer` unless peer is in `trusted`, then walk X-Forwarded-For from the right,
/// skipping trusted addresses; first untrusted one wins (malformed entries → stop and use the
/// last trusted hop).
///
/// Several `X-Forwarded-For` headers are read as one list, in order. Entries may carry a port
/// (`203.0.113.7:4711`, `[2001:db8::1]:443`), as some load balancers add one. If every entry is
/// trusted, the leftmost is the answer: it is the furthest hop anyone vouched for.
pub fn client_ip(peer: SocketAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let mut last_trusted = peer.ip().to_canonical();
    if !is_trusted(last_trusted, trusted) {
        return last_trusted;
    }
    let mut entries: Vec<Option<&str>> = Vec::new();
    for value in headers.get_all(&X_FORWARDED_FOR) {
        match value.to_str() {
            Ok(text) => entries.extend(text.split(',').map(Some)),
            // A value that is not text cannot be split reliably: treat it as one bad entry.
            Err(_) => entries.push(None),
        }
    }
    for entry in entries.into_iter().rev() {
        let Some(ip) = entry.and_then(parse_entry) else {
            return last_trusted;
        };
        if !is_trusted(ip, trusted) {
            return ip;
        }
        last_trusted = ip;
    }
    last_trusted
}

/// One `X-Forwarded-For` entry: an IP address, optionally with a port.
fn parse_entry(entry: &str) -> Option<IpAddr> {
    let entry = entry.trim();
    entry
        .parse::<IpAddr>()
        .or_else(|_| entry.parse::<SocketAddr>().map(|s| s.ip()))
        .ok()
        .map(|ip| ip.to_canonical())
}

// Tests may fail loudly; the crate-wide ban on unwrap/expect/panic is for production paths.
#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|n| n.parse().unwrap()).collect()
    }

    fn xff(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(X_FORWARDED_FOR, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    fn peer(ip: &str) -> SocketAddr {
        SocketAddr::new(ip.parse().unwrap(), 5555)
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn untrusted_peer_cannot_claim_another_address() {
        let trusted = nets(&["10.0.0.0/8"]);
        let h = xff(&["198.51.100.1"]);
        assert_eq!(
            client_ip(peer("203.0.113.9"), &h, &trusted),
            ip("203.0.113.9")
        );
        assert_eq!(client_ip(peer("203.0.113.9"), &h, &[]), ip("203.0.113.9"));
    }

    #[test]
    fn trusted_chain_is_walked_from_the_right() {
        let trusted = nets(&["10.0.0.0/8", "2001:db8::/32"]);
        let h = xff(&["198.51.100.1, 203.0.113.5, 10.1.1.1"]);
        assert_eq!(client_ip(peer("10.0.0.2"), &h, &trusted), ip("203.0.113.5"));
        // Several headers form one list; ports and IPv6 are understood.
        let h = xff(&[
            "198.51.100.1",
            "[2001:db8::7]:443 , 203.0.113.6:99, 10.1.1.1",
        ]);
        assert_eq!(client_ip(peer("10.0.0.2"), &h, &trusted), ip("203.0.113.6"));
    }

    #[test]
    fn malformed_entry_stops_at_last_trusted_hop() {
        let trusted = nets(&["10.0.0.0/8"]);
        let h = xff(&["198.51.100.1, bogus, 10.2.2.2"]);
        assert_eq!(client_ip(peer("10.0.0.2"), &h, &trusted), ip("10.2.2.2"));
        let h = xff(&["198.51.100.1,"]);
        assert_eq!(client_ip(peer("10.0.0.2"), &h, &trusted), ip("10.0.0.2"));
        let mut h = HeaderMap::new();
        h.append(
            X_FORWARDED_FOR,
            HeaderValue::from_bytes(b"198.51.100.1, \xff").unwrap(),
        );
        assert_eq!(client_ip(peer("10.0.0.2"), &h, &trusted), ip("10.0.0.2"));
    }

    #[test]
    fn all_trusted_means_leftmost_and_no_header_means_peer() {
        let trusted = nets(&["10.0.0.0/8"]);
        let h = xff(&["10.9.9.9, 10.1.1.1"]);
        assert_eq!(client_ip(peer("10.0.0.2"), &h, &trusted), ip("10.9.9.9"));
        assert_eq!(
            client_ip(peer("10.0.0.2"), &HeaderMap::new(), &trusted),
            ip("10.0.0.2")
        );
    }

    #[test]
    fn mapped_ipv4_is_compared_as_ipv4() {
        let trusted = nets(&["10.0.0.0/8"]);
        assert!(is_trusted(ip("::ffff:10.0.0.1"), &trusted));
        assert!(!is_trusted(ip("::ffff:11.0.0.1"), &trusted));
        let h = xff(&["::ffff:198.51.100.1"]);
        assert_eq!(
            client_ip(peer("::ffff:10.0.0.2"), &h, &trusted),
            ip("198.51.100.1")
        );
    }
}
