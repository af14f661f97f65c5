//! Embeddings, documents, collections and retrieval (with MiniLM from the model cache when
//! it was fetched), and training jobs.

use std::time::{Duration, Instant};

use base64::Engine as _;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

use crate::common::*;

const MINILM_NAME: &str = "all-MiniLM-L6-v2";

#[tokio::test]
async fn embeddings_as_floats_and_base64() {
    let Some(minilm) = minilm() else { return };
    let server = TestServer::start_with(|config| config.embedder = Some(minilm)).await;
    let (_, models) = server.get("/v1/models").await;
    assert!(
        models["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["id"] == MINILM_NAME),
        "{models}"
    );
    let inputs = json!(["The cat sat on the mat.", "Rust is a systems language."]);
    let (status, floats) = server
        .post(
            "/v1/embeddings",
            &json!({"model": MINILM_NAME, "input": inputs}),
        )
        .await;
    assert_eq!(status, 200, "{floats}");
    assert_eq!(floats["object"], "list");
    assert_eq!(floats["model"], MINILM_NAME);
    let first: Vec<f32> = floats["data"][0]["embedding"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    assert_eq!(first.len(), 384);
    let norm: f32 = first.iter().map(|v| v * v).sum::<f32>().sqrt();
    assert!((norm - 1.0).abs() < 1e-3, "normalized: {norm}");
    assert!(floats["usage"]["prompt_tokens"].as_u64().unwrap() > 0);

    let (status, encoded) = server
        .post(
            "/v1/embeddings",
            &json!({"input": inputs, "encoding_format": "base64"}),
        )
        .await;
    assert_eq!(status, 200);
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(encoded["data"][0]["embedding"].as_str().unwrap())
        .unwrap();
    let decoded: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(decoded, first);
    assert_eq!(encoded["data"][1]["index"], 1);

    for bad in [
        json!({"input": [[1, 2, 3]]}),
        json!({"input": []}),
        json!({"input": "x", "encoding_format": "int8"}),
    ] {
        let (status, body) = server.post("/v1/embeddings", &bad).await;
        assert_eq!(status, 400, "{bad}: {body}");
    }
    let (status, _) = server
        .post("/v1/embeddings", &json!({"input": "x", "model": "other"}))
        .await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn documents_collections_and_queries() {
    let Some(minilm) = minilm() else { return };
    let server = TestServer::start_with(|config| config.embedder = Some(minilm)).await;
    let (status, body) = server
        .post(
            "/api/query",
            &json!({"question": "What is Rust?", "collection": "docs"}),
        )
        .await;
    assert_eq!(status, 404, "{body}");

    let documents = json!({
        "collection": "docs",
        "documents": [
            {"name": "rust.md", "text": "# Rust\n\nRust is a systems language."},
            {"name": "../cats", "text": "Cats sleep most of the day."},
        ],
    });
    let (status, report) = server.post("/api/documents", &documents).await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["files"], 2, "{report}");
    assert_eq!(report["added"], 2);
    assert!(report["points"].as_u64().unwrap() >= 2);
    let (status, _) = server
        .post(
            "/api/documents",
            &json!({"collection": "../x", "documents": [{"name": "a", "text": "b"}]}),
        )
        .await;
    assert_eq!(status, 400);

    let (status, list) = server.get("/api/collections").await;
    assert_eq!(status, 200);
    let docs = list["collections"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "docs")
        .unwrap_or_else(|| panic!("docs in {list}"));
    assert_eq!(docs["dimension"], 384);
    assert!(docs["points"].as_u64().unwrap() >= 2);

    let query = json!({
        "question": "Which language is a systems language?",
        "collection": "docs",
        "k": 2,
        "max_tokens": 8,
    });
    let (status, answer) = server.post("/api/query", &query).await;
    assert_eq!(status, 200, "{answer}");
    assert!(answer["answer"].is_string(), "{answer}");
    assert_eq!(answer["cached"], false);
    let sources = answer["sources"].as_array().unwrap();
    assert!(!sources.is_empty());
    assert!(
        sources[0]["text"].as_str().unwrap().contains("Rust"),
        "{answer}"
    );
    let stages: Vec<&str> = answer["timings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["stage"].as_str().unwrap())
        .collect();
    assert!(
        stages.contains(&"generate") && stages.contains(&"search"),
        "{stages:?}"
    );
    let (status, again) = server.post("/api/query", &query).await;
    assert_eq!(status, 200);
    assert_eq!(again["cached"], true);
    assert_eq!(again["answer"], answer["answer"]);
    assert!(server.metric("moera_cache_hits_total").await >= 1.0);
    assert!(server.metric("moera_cache_misses_total").await >= 1.0);

    // A grounded stream names its sources first and last.
    let url = server.ws_url(&format!("/ws/stream?api_key={KEY}"));
    let (mut socket, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let request = json!({
        "messages": [{"role": "user", "content": "What is Rust?"}],
        "collection": "docs",
        "k": 1,
        "max_tokens": 8,
    });
    socket
        .send(Message::text(request.to_string()))
        .await
        .unwrap();
    let mut messages = Vec::new();
    while let Some(Ok(message)) = socket.next().await {
        if let Message::Text(text) = message {
            messages.push(serde_json::from_str::<Value>(text.as_str()).unwrap());
        }
    }
    let (start, done) = (&messages[0], messages.last().unwrap());
    assert_eq!(start["type"], "start", "{messages:?}");
    assert_eq!(done["type"], "done", "{messages:?}");
    assert_eq!(start["sources"].as_array().unwrap().len(), 1, "{start}");
    assert_eq!(start["sources"], done["sources"]);
}

#[tokio::test]
async fn retrieval_needs_an_embedder() {
    let server = TestServer::start().await;
    for (path, body) in [
        ("/api/query", json!({"question": "What?"})),
        (
            "/api/documents",
            json!({"documents": [{"name": "a.txt", "text": "b"}]}),
        ),
    ] {
        let (status, body) = server.post(path, &body).await;
        assert_eq!(status, 400, "{path}: {body}");
        assert!(error_message(&body, "invalid_request_error").contains("embedder"));
    }
    let (status, list) = server.get("/api/collections").await;
    assert_eq!(status, 200);
    assert_eq!(list["collections"], json!([]));
}

#[tokio::test]
async fn a_training_job_runs_in_the_background_and_streams_its_events() {
    let server = TestServer::start().await;
    let (status, body) = server.get("/api/train/train-nope").await;
    assert_eq!(status, 404, "{body}");
    let (status, body) = server
        .post("/api/train", &json!({"examples": [{"nonsense": 1}]}))
        .await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = server
        .post("/api/train", &json!({"examples": [], "strategy": "qlora"}))
        .await;
    assert_eq!(status, 400, "{body}");

    let examples: Vec<Value> = (0..4)
        .map(|i| json!({"prompt": format!("Say {i}:"), "completion": format!(" {i}")}))
        .collect();
    let (status, job) = server
        .post(
            "/api/train",
            &json!({
                "model": MODEL,
                "examples": examples,
                "strategy": "lora",
                "r": 4,
                "max_steps": 3,
                "seq_len": 64,
                "learning_rate": 1e-3,
            }),
        )
        .await;
    assert_eq!(status, 202, "{job}");
    let id = job["id"].as_str().unwrap().to_string();
    assert!(id.starts_with("train-"));

    let url = server.ws_url(&format!("/ws/train/{id}?api_key={KEY}"));
    let (mut socket, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let mut events = Vec::new();
    while let Some(message) = tokio::time::timeout(Duration::from_secs(120), socket.next())
        .await
        .expect("training events in time")
    {
        if let Message::Text(text) = message.unwrap() {
            events.push(serde_json::from_str::<Value>(text.as_str()).unwrap());
        }
    }
    let kinds: Vec<&str> = events
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert_eq!(kinds.first(), Some(&"started"), "{events:?}");
    assert_eq!(kinds.last(), Some(&"finished"), "{events:?}");
    assert_eq!(
        kinds.iter().filter(|k| **k == "step").count(),
        3,
        "{kinds:?}"
    );

    // The status turns finished once the adapter is saved.
    let started = Instant::now();
    let report = loop {
        let (status, report) = server.get(&format!("/api/train/{id}")).await;
        assert_eq!(status, 200);
        if report["status"] != "running" && report["status"] != "queued" {
            break report;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "{report}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(report["status"], "finished", "{report}");
    assert_eq!(report["events"].as_u64().unwrap() as usize, events.len());
    assert_eq!(report["last"]["event"], "finished");
    let out = std::path::PathBuf::from(report["out"].as_str().unwrap());
    assert!(out.join("adapter_model.safetensors").is_file(), "{report}");

    // A late subscriber gets the whole history, then the close.
    let url = server.ws_url(&format!("/ws/train/{id}?api_key={KEY}"));
    let (mut socket, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let mut replayed = 0;
    while let Some(Ok(message)) = socket.next().await {
        if message.is_text() {
            replayed += 1;
        }
    }
    assert_eq!(replayed, events.len());
}
