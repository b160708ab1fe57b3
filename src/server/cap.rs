//! A bound on the connections one client address holds open at once
//! (`server.max_connections_per_address`): a client that opens connections faster than
//! `server.header_timeout` closes them would otherwise use up the process's file descriptors and
//! keep every other client out. IPv6 clients are counted by their /64 (a host is handed a whole
//! /64), IPv4 by their address; the trusted proxies (`server.trusted_proxies`: a load balancer
//! carries many clients' connections) are not counted. A connection over the bound is closed as
//! soon as it is accepted, before anything is read from it.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv6Addr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use ipnet::IpNet;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// How often a refusal is logged for one address while it stays at the bound.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// The connections each client address holds on one listener.
#[derive(Debug)]
pub struct ConnectionCap {
    max: u32,
    exempt: Vec<IpNet>,
    setting: &'static str,
    open: Mutex<HashMap<IpAddr, Held>>,
    refused: Option<Arc<crate::metrics::Metrics>>,
}

#[derive(Debug)]
struct Held {
    count: u32,
    warned: Option<Instant>,
}

/// One admitted connection: the address's count goes down when it is dropped.
#[derive(Debug)]
pub struct Admitted {
    cap: Arc<ConnectionCap>,
    key: IpAddr,
}

impl ConnectionCap {
    /// `max` connections per address (0: no bound, and `None`), `exempt` the trusted proxies.
    pub fn new(
        max: u32,
        exempt: &[IpNet],
        setting: &'static str,
        metrics: Option<Arc<crate::metrics::Metrics>>,
    ) -> Option<Arc<Self>> {
        (max > 0).then(|| {
            Arc::new(Self {
                max,
                exempt: exempt.to_vec(),
                setting,
                open: Mutex::new(HashMap::new()),
                refused: metrics,
            })
        })
    }

    /// Counts a connection from `peer`, or refuses it (`None`) when its address holds the bound.
    /// A trusted proxy's connections are admitted uncounted.
    pub fn admit(self: &Arc<Self>, peer: IpAddr) -> Option<Option<Admitted>> {
        let peer = peer.to_canonical();
        if self.exempt.iter().any(|n| n.contains(&peer)) {
            return Some(None);
        }
        let key = counted_as(peer);
        let Ok(mut open) = self.open.lock() else {
            // A poisoned map (a panic while it was held): fail closed would refuse everyone;
            // the bound is a resource limit, not an access control, so admit uncounted.
            return Some(None);
        };
        let held = open.entry(key).or_insert(Held {
            count: 0,
            warned: None,
        });
        if held.count < self.max {
            held.count += 1;
            return Some(Some(Admitted {
                cap: self.clone(),
                key,
            }));
        }
        let now = Instant::now();
        if held
            .warned
            .is_none_or(|t| now.duration_since(t) >= WARN_EVERY)
        {
            held.warned = Some(now);
            tracing::warn!(
                client = %key,
                held = held.count,
                "connection refused: the client holds {} connections, the most `{}` allows (a \
                 load balancer or proxy in front of the gateway belongs in \
                 server.trusted_proxies); logged once a minute per client",
                held.count,
                self.setting
            );
        }
        drop(open);
        if let Some(m) = &self.refused {
            m.connection_refused();
        }
        None
    }

    #[cfg(test)]
    fn held(&self, peer: IpAddr) -> u32 {
        let open = self.open.lock().unwrap();
        open.get(&counted_as(peer.to_canonical()))
            .map_or(0, |h| h.count)
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        if let Ok(mut open) = self.cap.open.lock() {
            if let Some(held) = open.get_mut(&self.key) {
                held.count = held.count.saturating_sub(1);
                if held.count == 0 {
                    open.remove(&self.key);
                }
            }
        }
    }
}

/// The address a connection is counted under: an IPv6 address by its /64.
fn counted_as(peer: IpAddr) -> IpAddr {
    match peer {
        IpAddr::V4(_) => peer,
        IpAddr::V6(v6) => {
            let network = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(Ipv6Addr::from(network))
        }
    }
}

/// A connection together with its place under the bound, released when the connection is.
#[derive(Debug)]
pub struct Counted<S> {
    io: S,
    _admitted: Option<Admitted>,
}

impl<S> Counted<S> {
    pub fn new(io: S, admitted: Option<Admitted>) -> Self {
        Self {
            io,
            _admitted: admitted,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn an_address_holds_at_most_the_bound_and_gets_its_places_back() {
        let cap = ConnectionCap::new(2, &[], "server.max_connections_per_address", None).unwrap();
        let a = cap.admit(ip("192.0.2.1")).unwrap().unwrap();
        let b = cap.admit(ip("192.0.2.1")).unwrap().unwrap();
        assert!(cap.admit(ip("192.0.2.1")).is_none(), "a third is admitted");
        // Another address, and the same one written as IPv4-mapped IPv6, count apart / alike.
        assert!(cap.admit(ip("192.0.2.2")).unwrap().is_some());
        assert!(cap.admit(ip("::ffff:192.0.2.1")).is_none());
        drop(a);
        assert_eq!(cap.held(ip("192.0.2.1")), 1);
        let _c = cap.admit(ip("192.0.2.1")).unwrap().unwrap();
        drop(b);
        drop(_c);
        assert_eq!(cap.held(ip("192.0.2.1")), 0);
        assert!(
            cap.open.lock().unwrap().is_empty(),
            "a freed address is kept"
        );
    }

    #[test]
    fn ipv6_is_counted_by_its_64_and_trusted_proxies_are_not_counted() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let cap = ConnectionCap::new(1, &trusted, "x", None).unwrap();
        let _a = cap.admit(ip("2001:db8:1:2::1")).unwrap().unwrap();
        assert!(
            cap.admit(ip("2001:db8:1:2:ffff::9")).is_none(),
            "another address of the same /64 is counted apart"
        );
        assert!(cap.admit(ip("2001:db8:1:3::1")).unwrap().is_some());
        for _ in 0..10 {
            assert!(matches!(cap.admit(ip("10.1.2.3")), Some(None)));
        }
        assert!(ConnectionCap::new(0, &[], "x", None).is_none());
    }
}
