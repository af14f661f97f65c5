//! `/ws/stream` with a tokio-tungstenite client: a whole stream, a client that goes away
//! mid-stream (its generation stops, the server stays healthy), and graceful shutdown.

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use crate::common::*;

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(server: &TestServer) -> Socket {
    let url = server.ws_url(&format!("/ws/stream?api_key={KEY}"));
    let (socket, response) = tokio_tungstenite::connect_async(url)
        .await
        .expect("WebSocket handshake");
    assert_eq!(response.status(), 101);
    socket
}

/// The next JSON message, `None` once the server closed.
async fn next_json(socket: &mut Socket) -> Option<Value> {
    loop {
        let message = tokio::time::timeout(Duration::from_secs(60), socket.next())
            .await
            .expect("a message in time")?;
        match message.expect("a WebSocket message") {
            Message::Text(text) => return Some(serde_json::from_str(text.as_str()).unwrap()),
            Message::Close(_) => return None,
            _ => continue,
        }
    }
}

/// Reads to the end: the token texts and the final message.
async fn read_to_end(socket: &mut Socket) -> (String, Value) {
    let mut text = String::new();
    while let Some(message) = next_json(socket).await {
        match message["type"].as_str() {
            Some("token") => text.push_str(message["text"].as_str().unwrap()),
            Some("done") | Some("error") => return (text, message),
            other => panic!("unexpected message {other:?}: {message}"),
        }
    }
    panic!("closed before the end");
}

#[tokio::test]
async fn a_whole_stream_ends_with_done() {
    let server = TestServer::start().await;
    let mut socket = connect(&server).await;
    let request = json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": "Hello there"}],
        "max_tokens": 12,
        "temperature": 0,
    });
    socket
        .send(Message::text(request.to_string()))
        .await
        .unwrap();
    let start = next_json(&mut socket).await.expect("a start message");
    assert_eq!(start["type"], "start", "{start}");
    assert_eq!(start["model"], MODEL);
    assert!(start["prompt_tokens"].as_u64().unwrap() > 0);
    let (text, done) = read_to_end(&mut socket).await;
    assert_eq!(done["type"], "done", "{done}");
    let completion = done["usage"]["completion_tokens"].as_u64().unwrap();
    assert!((1..=12).contains(&completion), "{done}");
    assert_eq!(
        done["usage"]["total_tokens"].as_u64().unwrap(),
        start["prompt_tokens"].as_u64().unwrap() + completion
    );
    assert!(next_json(&mut socket).await.is_none(), "closed after done");

    // The same request over HTTP gives the same text (greedy).
    let (_, whole) = server
        .post(
            "/v1/chat/completions",
            &json!({
                "messages": [{"role": "user", "content": "Hello there"}],
                "max_tokens": 12,
                "temperature": 0,
            }),
        )
        .await;
    assert_eq!(whole["choices"][0]["message"]["content"], text.as_str());
}

#[tokio::test]
async fn bad_websocket_requests() {
    let server = TestServer::start().await;
    // A wrong key fails the handshake with 401.
    let url = server.ws_url("/ws/stream?api_key=wrong");
    match tokio_tungstenite::connect_async(url).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 401)
        }
        other => panic!("expected a 401, got {other:?}"),
    }
    // The key in the header works too.
    let mut request =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
            server.ws_url("/ws/stream"),
        )
        .unwrap();
    request
        .headers_mut()
        .insert("authorization", format!("Bearer {KEY}").parse().unwrap());
    let (mut socket, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    socket.send(Message::text("{not json")).await.unwrap();
    let error = next_json(&mut socket).await.unwrap();
    assert_eq!(error["type"], "error");
    assert_eq!(error["status"], 400);
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("malformed JSON")
    );
    assert!(next_json(&mut socket).await.is_none());

    for (request, status) in [
        (json!({"model": "nope", "prompt": "hi"}), 404),
        (json!({"prompt": "hi ".repeat(600)}), 400),
        (json!({"prompt": ""}), 400),
        (json!({"prompt": "hi", "collection": "docs"}), 400),
    ] {
        let mut socket = connect(&server).await;
        socket
            .send(Message::text(request.to_string()))
            .await
            .unwrap();
        let error = next_json(&mut socket).await.unwrap();
        assert_eq!(error["type"], "error", "{request}");
        assert_eq!(error["status"], status, "{request}: {error}");
    }
    // A plain GET is told it is a WebSocket.
    let response = client()
        .get(server.url("/ws/stream"))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
}

#[tokio::test]
async fn a_client_that_goes_away_cancels_its_generation() {
    let server = TestServer::start().await;
    let mut socket = connect(&server).await;
    // Long enough that it cannot end before the client leaves.
    let request = json!({
        "prompt": "Once upon a time",
        "max_tokens": 480,
        "ignore_eos": true,
    });
    socket
        .send(Message::text(request.to_string()))
        .await
        .unwrap();
    assert_eq!(next_json(&mut socket).await.unwrap()["type"], "start");
    let mut tokens = 0;
    while tokens < 3 {
        let message = next_json(&mut socket).await.expect("tokens");
        assert_eq!(message["type"], "token", "{message}");
        tokens += 1;
    }
    drop(socket);

    let started = Instant::now();
    server.wait_idle(Duration::from_secs(5)).await;
    eprintln!("idle {:?} after the disconnect", started.elapsed());
    assert!(server.metric("moera_cancelled_total").await >= 1.0);
    assert!(
        server.metric("moera_generated_tokens_total").await < 480.0,
        "the generation stopped early"
    );
    assert_eq!(server.metric("moera_running_sequences").await, 0.0);

    // The server is healthy: a new request works.
    let (status, health) = server.get("/health").await;
    assert_eq!((status, &health["status"]), (200, &json!("ok")));
    let mut socket = connect(&server).await;
    socket
        .send(Message::text(
            json!({"prompt": "Hello", "max_tokens": 4}).to_string(),
        ))
        .await
        .unwrap();
    assert_eq!(next_json(&mut socket).await.unwrap()["type"], "start");
    let (_, done) = read_to_end(&mut socket).await;
    assert_eq!(done["type"], "done");
}

#[tokio::test]
async fn graceful_shutdown_lets_streams_finish() {
    let mut server = TestServer::start().await;
    let max_tokens = 200;
    let mut socket = connect(&server).await;
    socket
        .send(Message::text(
            json!({"prompt": "Once upon a time", "max_tokens": max_tokens, "ignore_eos": true})
                .to_string(),
        ))
        .await
        .unwrap();
    assert_eq!(next_json(&mut socket).await.unwrap()["type"], "start");
    let sse = client()
        .post(server.url("/v1/completions"))
        .bearer_auth(KEY)
        .json(&json!({
            "prompt": "Once upon a time",
            "max_tokens": max_tokens,
            "ignore_eos": true,
            "stream": true,
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(sse.status(), 200);
    let mut body = sse.bytes_stream();
    let first = body.next().await.expect("a first chunk").unwrap();
    assert!(!first.is_empty());

    let stop_addr = server.addr;
    let stopping = tokio::spawn(async move {
        server
            .stopped(Duration::from_secs(60))
            .await
            .map(|()| server)
    });

    // Both streams run to their end.
    let (_, done) = read_to_end(&mut socket).await;
    assert_eq!(done["type"], "done", "{done}");
    assert_eq!(done["finish_reason"], "length");
    assert_eq!(done["usage"]["completion_tokens"], max_tokens);
    let mut rest = String::from_utf8_lossy(&first).into_owned();
    while let Some(chunk) = body.next().await {
        rest.push_str(&String::from_utf8_lossy(
            &chunk.expect("the SSE stream ends cleanly"),
        ));
    }
    assert_eq!(sse_data(&rest).last().map(String::as_str), Some("[DONE]"));
    assert!(rest.contains("\"finish_reason\":\"length\""), "{rest}");

    // `run` returned, and nothing listens any more.
    let server = stopping.await.unwrap().expect("a clean shutdown");
    assert!(server.state.scheduler_stats().running == 0);
    assert!(
        tokio::net::TcpStream::connect(stop_addr).await.is_err(),
        "the listener is closed"
    );
}
