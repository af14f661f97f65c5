//! The HTTP API: authentication, refusals of bad requests, chat and completions (whole
//! and streamed), models and metrics.

use serde_json::{Value, json};

use crate::common::*;

fn chat(max_tokens: usize) -> Value {
    json!({
        "model": MODEL,
        "messages": [{"role": "user", "content": "Hello there"}],
        "max_tokens": max_tokens,
        "temperature": 0,
    })
}

#[tokio::test]
async fn health_is_open_and_everything_else_needs_the_key() {
    let server = TestServer::start().await;
    let response = client().get(server.url("/health")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let health: Value = response.json().await.unwrap();
    assert_eq!(health["status"], "ok");
    assert_eq!(health["models"], json!([MODEL]));
    assert_eq!(health["running"], 0);

    for path in ["/v1/models", "/metrics", "/api/collections"] {
        let missing = client().get(server.url(path)).send().await.unwrap();
        assert_eq!(missing.status(), 401, "{path} without a key");
        assert_eq!(missing.headers()["www-authenticate"], "Bearer");
        let body: Value = missing.json().await.unwrap();
        error_message(&body, "authentication_error");
        let wrong = client()
            .get(server.url(path))
            .bearer_auth("test-key-0124")
            .send()
            .await
            .unwrap();
        assert_eq!(wrong.status(), 401, "{path} with a wrong key");
    }
    let wrong_post = client()
        .post(server.url("/v1/chat/completions"))
        .bearer_auth("nope")
        .json(&chat(4))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong_post.status(), 401);

    // The page is open: it asks for the key when the API answers 401.
    let page = client().get(server.url("/")).send().await.unwrap();
    assert_eq!(page.status(), 200);
    assert!(
        page.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    for path in ["/app.js", "/style.css"] {
        assert_eq!(
            client()
                .get(server.url(path))
                .send()
                .await
                .unwrap()
                .status(),
            200
        );
    }

    let (status, models) = server.get("/v1/models").await;
    assert_eq!(status, 200);
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], MODEL);
    assert_eq!(models["data"][0]["object"], "model");
    assert_eq!(models["data"][0]["max_model_len"], CONTEXT);
    let (status, one) = server.get(&format!("/v1/models/{MODEL}")).await;
    assert_eq!((status, &one["id"]), (200, &json!(MODEL)));

    let (status, body) = server.get("/no/such/path").await;
    assert_eq!(status, 404);
    error_message(&body, "not_found_error");
}

#[tokio::test]
async fn bad_requests_are_refused_with_a_message_never_a_500() {
    let server = TestServer::start().await;
    let url = server.url("/v1/chat/completions");

    // Over the body limit (64 KiB in tests).
    let huge = json!({"messages": [{"role": "user", "content": "x".repeat(100_000)}]});
    let response = client()
        .post(&url)
        .bearer_auth(KEY)
        .json(&huge)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 413);
    let body: Value = response.json().await.unwrap();
    error_message(&body, "invalid_request_error");

    // Malformed JSON, and JSON of the wrong shape.
    for (bad, expect) in [
        ("{\"messages\": [", "malformed JSON"),
        ("not json", "malformed JSON"),
        ("{\"model\": \"tiny-chat\"}", "messages"),
        ("{\"messages\": \"hi\"}", "malformed JSON"),
    ] {
        let response = client()
            .post(&url)
            .bearer_auth(KEY)
            .header("content-type", "application/json")
            .body(bad)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "{bad}");
        let body: Value = response.json().await.unwrap();
        let message = error_message(&body, "invalid_request_error");
        assert!(message.contains(expect), "{bad}: {message}");
    }

    // Unknown model.
    let mut request = chat(4);
    request["model"] = json!("gpt-4");
    let (status, body) = server.post("/v1/chat/completions", &request).await;
    assert_eq!(status, 404);
    assert!(error_message(&body, "not_found_error").contains("gpt-4"));
    let (status, _) = server
        .post("/v1/completions", &json!({"model": "nope", "prompt": "a"}))
        .await;
    assert_eq!(status, 404);

    // A prompt over the context window, and room asked for beyond it.
    let long = json!({
        "messages": [{"role": "user", "content": "hello world ".repeat(600)}],
    });
    let (status, body) = server.post("/v1/chat/completions", &long).await;
    assert_eq!(status, 400, "{body}");
    assert!(error_message(&body, "invalid_request_error").contains("context"));
    let (status, body) = server.post("/v1/chat/completions", &chat(CONTEXT)).await;
    assert_eq!(status, 400, "{body}");
    assert!(error_message(&body, "invalid_request_error").contains("exceeds the context"));

    // Parameters out of range.
    for (field, value) in [
        ("temperature", json!(3.0)),
        ("top_p", json!(0)),
        ("n", json!(2)),
        ("max_tokens", json!(0)),
        ("max_tokens", json!(-1)),
        ("presence_penalty", json!(1.0)),
        ("stop", json!(["a", "b", "c", "d", "e"])),
    ] {
        let mut request = chat(4);
        request[field] = value.clone();
        let (status, body) = server.post("/v1/chat/completions", &request).await;
        assert_eq!(status, 400, "{field} = {value}: {body}");
        error_message(&body, "invalid_request_error");
    }
    let (status, _) = server
        .post("/v1/chat/completions", &json!({"messages": []}))
        .await;
    assert_eq!(status, 400);
    let (status, _) = server
        .post("/v1/completions", &json!({"prompt": [1, 2, 3]}))
        .await;
    assert_eq!(status, 400);
    // No embedder configured.
    let (status, body) = server
        .post("/v1/embeddings", &json!({"input": "hi", "model": "x"}))
        .await;
    assert_eq!(status, 404);
    error_message(&body, "not_found_error");

    // None of that was a 500, and the server still answers.
    let metrics = server.metrics().await;
    assert!(!metrics.contains("status=\"500\""), "{metrics}");
    let (status, _) = server.post("/v1/chat/completions", &chat(2)).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn chat_whole_and_streamed_agree() {
    let server = TestServer::start().await;
    let (status, whole) = server.post("/v1/chat/completions", &chat(8)).await;
    assert_eq!(status, 200, "{whole}");
    assert_eq!(whole["object"], "chat.completion");
    assert!(whole["id"].as_str().unwrap().starts_with("chatcmpl-"));
    assert_eq!(whole["model"], MODEL);
    let choice = &whole["choices"][0];
    assert_eq!(choice["message"]["role"], "assistant");
    let text = choice["message"]["content"].as_str().unwrap().to_string();
    let reason = choice["finish_reason"].as_str().unwrap();
    assert!(reason == "stop" || reason == "length", "{reason}");
    let usage = &whole["usage"];
    let (prompt, completion) = (
        usage["prompt_tokens"].as_u64().unwrap(),
        usage["completion_tokens"].as_u64().unwrap(),
    );
    assert!(prompt > 0 && (1..=8).contains(&completion), "{usage}");
    assert_eq!(usage["total_tokens"].as_u64().unwrap(), prompt + completion);

    let mut request = chat(8);
    request["stream"] = json!(true);
    request["stream_options"] = json!({"include_usage": true});
    let response = client()
        .post(server.url("/v1/chat/completions"))
        .bearer_auth(KEY)
        .json(&request)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let body = response.text().await.unwrap();
    let events = sse_data(&body);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{body}");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e).unwrap())
        .collect();
    assert_eq!(chunks[0]["object"], "chat.completion.chunk");
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let streamed: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(streamed, text, "greedy: streamed equals whole");
    let finish = chunks
        .iter()
        .find(|c| !c["choices"][0]["finish_reason"].is_null())
        .expect("a chunk with the finish reason");
    assert_eq!(finish["choices"][0]["finish_reason"], reason);
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"], json!([]));
    assert_eq!(&last["usage"], usage);
    let ids: std::collections::HashSet<_> = chunks.iter().map(|c| c["id"].clone()).collect();
    assert_eq!(ids.len(), 1, "every chunk has the same id");

    let metrics = server.metrics().await;
    assert!(
        metrics.contains("moera_requests_total{route=\"/v1/chat/completions\",status=\"200\"} 2"),
        "{metrics}"
    );
    assert!(server.metric("moera_generated_tokens_total").await >= 2.0);
    assert!(server.metric("moera_prompt_tokens_total").await >= 2.0 * prompt as f64);
    assert!(
        server
            .metric("moera_time_to_first_token_seconds_count")
            .await
            >= 2.0
    );
    assert_eq!(server.metric("moera_breaker_state").await, 0.0);
}

#[tokio::test]
async fn completions_whole_and_streamed() {
    let server = TestServer::start().await;
    let request = json!({
        "model": MODEL,
        "prompt": ["Once upon a time"],
        "max_tokens": 6,
        "temperature": 0,
        "ignore_eos": true,
    });
    let (status, whole) = server.post("/v1/completions", &request).await;
    assert_eq!(status, 200, "{whole}");
    assert_eq!(whole["object"], "text_completion");
    assert_eq!(whole["choices"][0]["finish_reason"], "length");
    assert_eq!(whole["usage"]["completion_tokens"], 6);
    let text = whole["choices"][0]["text"].as_str().unwrap();

    let mut streaming = request.clone();
    streaming["stream"] = json!(true);
    let body = client()
        .post(server.url("/v1/completions"))
        .bearer_auth(KEY)
        .json(&streaming)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let events = sse_data(&body);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let streamed: String = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str::<Value>(e).unwrap())
        .filter_map(|c| c["choices"][0]["text"].as_str().map(str::to_string))
        .collect();
    assert_eq!(streamed, text);
    // No usage chunk unless asked for.
    assert!(!body.contains("\"usage\""), "{body}");
}

#[tokio::test]
async fn a_stop_string_ends_the_answer_before_it() {
    let server = TestServer::start().await;
    let base = json!({"prompt": "Once upon a time", "max_tokens": 12, "ignore_eos": true});
    let (_, whole) = server.post("/v1/completions", &base).await;
    let text = whole["choices"][0]["text"].as_str().unwrap().to_string();
    let Some(stop) = text.chars().nth(3).filter(|c| !c.is_whitespace()) else {
        eprintln!("SKIPPED: no usable stop character in {text:?}");
        return;
    };
    let mut request = base.clone();
    request["stop"] = json!(stop.to_string());
    let (status, stopped) = server.post("/v1/completions", &request).await;
    assert_eq!(status, 200);
    let cut = stopped["choices"][0]["text"].as_str().unwrap();
    assert!(!cut.contains(stop), "{cut:?} contains {stop:?}");
    assert!(text.starts_with(cut));
    assert_eq!(stopped["choices"][0]["finish_reason"], "stop");
}
