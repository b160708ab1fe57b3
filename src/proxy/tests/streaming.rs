//! Bodies and upgraded connections through a real gateway, and what the proxy writes to logs.

use futures_util::SinkExt;
use http_body_util::BodyExt;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message as WsMessage;

use super::*;

const BIG: usize = 8 * 1024 * 1024 + 12_345;

#[tokio::test]
async fn large_upload_arrives_intact() {
    let up = start_upstream().await;
    let gw = start_gateway(Upstream::new(&config(up.addr, "/"))).await;
    // Streamed from the client in pieces of uneven size, with no Content-Length.
    let pieces = futures_util::stream::unfold(0usize, |offset| async move {
        (offset < BIG).then(|| {
            let len = 100_003.min(BIG - offset);
            (
                Ok::<_, Infallible>(pattern_chunk(offset, len)),
                offset + len,
            )
        })
    });
    let res = reqwest::Client::new()
        .post(format!("http://{gw}/upload"))
        .body(reqwest::Body::wrap_stream(pieces))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let expected = format!("{BIG}:{}", sha256_hex(&pattern_chunk(0, BIG)));
    assert_eq!(res.text().await.unwrap(), expected);
}

#[tokio::test]
async fn large_download_arrives_intact() {
    let up = start_upstream().await;
    let gw = start_gateway(Upstream::new(&config(up.addr, "/"))).await;
    let res = reqwest::get(format!("http://{gw}/download/{BIG}"))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let mut hasher = Sha256::new();
    let mut count = 0usize;
    let mut stream = res.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        count += chunk.len();
        hasher.update(&chunk);
    }
    assert_eq!(count, BIG);
    assert_eq!(
        hex::encode(hasher.finalize()),
        sha256_hex(&pattern_chunk(0, BIG))
    );
}

/// A full-duplex echo: each request chunk must come back before the next one is even sent. A
/// proxy that buffered either body would never return the first chunk, and the test would time
/// out.
#[tokio::test]
async fn bodies_stream_without_buffering() {
    let up = start_upstream().await;
    let upstream = Upstream::new(&config(up.addr, "/"));
    let (tx, rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(1);
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|c| (Ok::<_, Infallible>(c), rx))
    });
    let req = request(Method::POST, "/", &[], Body::from_stream(body));
    let forwarding_done =
        tokio::spawn(async move { upstream.forward(req, forwarding("/echo")).await });

    tx.send(bytes::Bytes::from_static(b"first")).await.unwrap();
    let limit = Duration::from_secs(5);
    let res = tokio::time::timeout(limit, forwarding_done)
        .await
        .expect("response headers arrive while the upload is still open")
        .unwrap()
        .unwrap();
    let mut body = res.into_body();
    for (i, piece) in [&b"first"[..], b"second", b"third"].into_iter().enumerate() {
        if i > 0 {
            tx.send(bytes::Bytes::copy_from_slice(piece)).await.unwrap();
        }
        let mut got = Vec::new();
        while got.len() < piece.len() {
            let frame = tokio::time::timeout(limit, body.frame())
                .await
                .expect("echoed chunk arrives before the upload ends")
                .unwrap()
                .unwrap();
            got.extend_from_slice(&frame.into_data().unwrap());
        }
        assert_eq!(got, piece);
    }
    drop(tx);
    assert!(body.frame().await.is_none());
}

#[tokio::test]
async fn websocket_echo_through_gateway() {
    let up = start_upstream().await;
    let gw = start_gateway(Upstream::new(&config(up.addr, "/"))).await;
    let mut handshake = format!("ws://{gw}/ws").into_client_request().unwrap();
    handshake
        .headers_mut()
        .insert("sec-websocket-protocol", HeaderValue::from_static("chat"));
    handshake.headers_mut().insert(
        "cookie",
        HeaderValue::from_static("portcullis-session=SECRET; theme=dark"),
    );
    let (mut socket, response) = tokio_tungstenite::connect_async(handshake).await.unwrap();
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    assert_eq!(response.headers()["sec-websocket-protocol"], "chat");

    for text in ["hello", "second message"] {
        socket.send(WsMessage::text(text)).await.unwrap();
        let reply = tokio::time::timeout(Duration::from_secs(5), socket.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(reply, WsMessage::text(text));
    }
    socket.close(None).await.unwrap();

    let seen = up.seen.last();
    assert_eq!(seen.uri, "/ws");
    assert_eq!(seen.headers["upgrade"], "websocket");
    assert_eq!(seen.headers["cookie"], "theme=dark");
    assert_eq!(seen.headers["x-portcullis-assertion"], "signed.jwt");
}

#[tokio::test]
async fn logs_hold_no_header_values() {
    // The test runtime has one thread, so the servers' tasks log to this subscriber too.
    let (captured, _guard) = crate::test_logs::capture();

    let up = start_upstream().await;
    let upstream = Upstream::new(&config(up.addr, "/"));
    let secrets = [
        (
            "cookie",
            "portcullis-session=COOKIE-SECRET; other=COOKIE2-SECRET",
        ),
        ("authorization", "Bearer AUTH-SECRET"),
        ("x-portcullis-assertion", "FORGED-SECRET"),
    ];
    let req = request(Method::GET, "/", &secrets, Body::empty());
    upstream.forward(req, forwarding("/cookies")).await.unwrap();
    let req = request(Method::GET, "/", &secrets, Body::empty());
    let _ = Upstream::new(&config("127.0.0.1:9".parse().unwrap(), "/"))
        .forward(req, forwarding("/?token=QUERY-SECRET"))
        .await;

    let text = captured.text();
    assert!(text.contains("upstream responded"), "logging was captured");
    assert!(text.contains("Set-Cookie"), "cookie filtering was logged");
    for needle in ["SECRET", "signed.jwt", "evil"] {
        assert!(!text.contains(needle), "log contains {needle}: {text}");
    }
}
