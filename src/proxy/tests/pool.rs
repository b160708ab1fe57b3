//! The upstream connection pool, against a hand-written HTTP/1.1 upstream that counts the
//! connections it accepts and can close them when a test asks it to.

use std::sync::atomic::{AtomicUsize, Ordering};

use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;

/// An upstream that answers, per request path: `/` → `200 ok`; `/empty` → `204`; `/close` →
/// `200 ok` and closes the connection 20 ms later without having said so (as an idle timeout
/// does);
/// `/big` → a 1 MiB body; `/early` → `413` at once, before reading the request's body. Returns its address and the number of connections accepted.
async fn raw_upstream() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        loop {
            let (mut conn, _) = listener.accept().await.unwrap();
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = Vec::new();
                loop {
                    let end = loop {
                        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break p + 4;
                        }
                        let mut chunk = [0u8; 4096];
                        match conn.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).to_string();
                    buf.drain(..end);
                    let path = head.split_whitespace().nth(1).unwrap_or("/").to_string();
                    if path == "/early" {
                        // Answers before reading the upload, then only drains it.
                        let head = b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 0\r\n\r\n";
                        if conn.write_all(head).await.is_err() {
                            return;
                        }
                        let mut sink = [0u8; 4096];
                        while matches!(conn.read(&mut sink).await, Ok(n) if n > 0) {}
                        return;
                    }
                    let answer: Vec<u8> = match path.as_str() {
                        "/empty" => b"HTTP/1.1 204 No Content\r\n\r\n".to_vec(),
                        "/big" => {
                            let mut a =
                                b"HTTP/1.1 200 OK\r\nContent-Length: 1048576\r\n\r\n".to_vec();
                            a.extend(std::iter::repeat_n(b'x', 1 << 20));
                            a
                        }
                        _ => b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".to_vec(),
                    };
                    if conn.write_all(&answer).await.is_err() {
                        return;
                    }
                    if path == "/close" {
                        // Closed a moment later, while the connection sits idle in the pool.
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        return;
                    }
                }
            });
        }
    });
    (addr, accepted)
}

async fn get(upstream: &Upstream, path: &str) -> (StatusCode, Vec<u8>) {
    let req = request(Method::GET, path, &[], Body::empty());
    let res = upstream.forward(req, forwarding(path)).await.unwrap();
    let status = res.status();
    let body = res.into_body().collect().await.unwrap().to_bytes().to_vec();
    (status, body)
}

#[tokio::test]
async fn a_connection_carries_one_request_after_another() {
    let (addr, accepted) = raw_upstream().await;
    let upstream = Upstream::new(&config(addr, "/"));
    for path in ["/", "/empty", "/", "/big", "/", "/empty"] {
        let (status, body) = get(&upstream, path).await;
        assert!(status.is_success(), "{path}: {status}");
        let want = match path {
            "/" => 2,
            "/big" => 1 << 20,
            _ => 0,
        };
        assert_eq!(body.len(), want, "{path}");
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "every request on one kept-alive connection"
    );
}

#[tokio::test]
async fn idle_connections_the_upstream_closed_are_never_used() {
    let (addr, accepted) = raw_upstream().await;
    let upstream = Upstream::new(&config(addr, "/"));
    for round in 0..5 {
        let (status, body) = get(&upstream, "/close").await;
        assert_eq!(
            (status, body.as_slice()),
            (StatusCode::OK, &b"ok"[..]),
            "round {round}"
        );
        // Next request once the upstream has closed the idle connection.
        tokio::time::sleep(Duration::from_millis(60)).await;
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 5);
}

#[tokio::test]
async fn a_body_left_unread_takes_its_connection_with_it() {
    let (addr, accepted) = raw_upstream().await;
    let upstream = Upstream::new(&config(addr, "/"));
    let req = request(Method::GET, "/big", &[], Body::empty());
    let res = upstream.forward(req, forwarding("/big")).await.unwrap();
    assert_eq!(res.status(), StatusCode::OK);
    drop(res);
    // The rest of the 1 MiB is still on that connection: the next answer must come from a new
    // one, not from the leftover bytes.
    let (status, body) = get(&upstream, "/").await;
    assert_eq!((status, body.as_slice()), (StatusCode::OK, &b"ok"[..]));
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
}

const CODES: [u16; 7] = [200, 201, 202, 404, 418, 500, 503];

#[tokio::test]
async fn concurrent_requests_each_get_their_own_answer() {
    let up = start_upstream().await;
    let upstream = Upstream::new(&config(up.addr, "/"));
    let answers = futures_util::future::join_all((0..32).map(|i| {
        let upstream = upstream.clone();
        async move {
            let path = format!("/status/{}", CODES[i % CODES.len()]);
            let req = request(Method::GET, &path, &[], Body::empty());
            let res = upstream.forward(req, forwarding(&path)).await.unwrap();
            (i, res.status().as_u16())
        }
    }))
    .await;
    for (i, status) in answers {
        assert_eq!(status, CODES[i % CODES.len()]);
    }
    assert_eq!(up.seen.count(), 32);
}

#[tokio::test]
async fn a_connection_still_busy_with_an_upload_is_not_waited_for() {
    let (addr, accepted) = raw_upstream().await;
    let upstream = Upstream::new(&config(addr, "/"));
    // An upload that never ends, answered early by the upstream.
    let endless = futures_util::stream::once(async { Ok::<_, Infallible>(vec![b'x'; 1024]) })
        .chain(futures_util::stream::pending());
    let req = request(
        Method::POST,
        "/early",
        &[("transfer-encoding", "chunked")],
        Body::from_stream(endless),
    );
    let res = upstream.forward(req, forwarding("/early")).await.unwrap();
    assert_eq!(res.status(), StatusCode::PAYLOAD_TOO_LARGE);
    drop(res);
    // The next request does not queue behind the upload (that would end in a 504 after the
    // response timeout): it gets a connection of its own.
    let started = std::time::Instant::now();
    let (status, body) = get(&upstream, "/").await;
    assert_eq!((status, body.as_slice()), (StatusCode::OK, &b"ok"[..]));
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
}
