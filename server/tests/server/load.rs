//! Load on loopback: concurrent streaming clients against one single client, on the tiny
//! model. Bounded in time (`MOERA_LOAD_SECONDS`, default 60 for the concurrent phase) and in
//! count (each client stops after `MAX_REQUESTS_PER_CLIENT` requests).

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{Value, json};

use crate::common::{KEY, MODEL, TestServer, client};

const CLIENTS: usize = 32;
const MAX_TOKENS: usize = 64;
const MAX_REQUESTS_PER_CLIENT: usize = 10_000;

/// What one client saw.
#[derive(Default)]
struct ClientLog {
    tokens: usize,
    requests: usize,
    errors: Vec<String>,
    /// Seconds from sending a request to its first token.
    ttft: Vec<f64>,
    /// Seconds between consecutive tokens of a stream.
    itl: Vec<f64>,
}

/// One streaming completion: records its first-token time, gaps and token count.
async fn stream_once(http: &reqwest::Client, url: &str, client: usize, log: &mut ClientLog) {
    let body = json!({
        "model": MODEL,
        "prompt": format!("Client {client} asks for a story number {}", log.requests),
        "max_tokens": MAX_TOKENS,
        // Greedy, as throughput benchmarks run; prompts differ, so do the sequences.
        "temperature": 0.0,
        "stream": true,
        "stream_options": {"include_usage": true},
        // Every request makes MAX_TOKENS tokens, so the phases compare like with like.
        "ignore_eos": true,
    });
    let sent = Instant::now();
    log.requests += 1;
    let response = match http.post(url).bearer_auth(KEY).json(&body).send().await {
        Ok(response) if response.status().is_success() => response,
        Ok(response) => {
            let status = response.status();
            let text = response.text().await.unwrap_or_default();
            log.errors.push(format!("{status}: {text}"));
            return;
        }
        Err(e) => {
            log.errors.push(e.to_string());
            return;
        }
    };
    let mut bytes = response.bytes_stream();
    let (mut buffer, mut last, mut done) = (String::new(), None::<Instant>, false);
    while let Some(chunk) = bytes.next().await {
        let chunk = match chunk {
            Ok(chunk) => chunk,
            Err(e) => {
                log.errors.push(e.to_string());
                return;
            }
        };
        buffer.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buffer.find("\n\n") {
            let event: String = buffer.drain(..end + 2).collect();
            let Some(data) = event.trim().strip_prefix("data: ") else {
                continue;
            };
            if data == "[DONE]" {
                done = true;
                continue;
            }
            // The client shares the machine with the server: it parses only the final
            // usage chunk, and tells token chunks by their non-empty text.
            if data.contains("\"usage\"") {
                let Ok(value) = serde_json::from_str::<Value>(data) else {
                    log.errors.push(format!("bad event: {data}"));
                    continue;
                };
                if let Some(tokens) = value["usage"]["completion_tokens"].as_u64() {
                    log.tokens += tokens as usize;
                }
                continue;
            }
            if !data.contains("\"text\":\"\"") {
                let now = Instant::now();
                match last {
                    None => log.ttft.push((now - sent).as_secs_f64()),
                    Some(previous) => log.itl.push((now - previous).as_secs_f64()),
                }
                last = Some(now);
            }
        }
    }
    if !done {
        log.errors.push("stream ended without [DONE]".into());
    }
}

/// `clients` clients sending streaming requests back to back for `seconds`.
async fn phase(server: &TestServer, clients: usize, seconds: f64) -> (Vec<ClientLog>, f64) {
    let url = server.url("/v1/completions");
    let http = client();
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(seconds);
    let tasks = (0..clients).map(|c| {
        let (http, url) = (http.clone(), url.clone());
        tokio::spawn(async move {
            let mut log = ClientLog::default();
            while Instant::now() < deadline && log.requests < MAX_REQUESTS_PER_CLIENT {
                stream_once(&http, &url, c, &mut log).await;
            }
            log
        })
    });
    let logs = futures_util::future::join_all(tasks)
        .await
        .into_iter()
        .map(|r| r.expect("client task"))
        .collect();
    (logs, started.elapsed().as_secs_f64())
}

fn percentile(values: &mut [f64], p: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * (values.len() - 1) as f64).round() as usize;
    values[rank]
}

fn summary(logs: &[ClientLog], seconds: f64) -> Value {
    let tokens: usize = logs.iter().map(|l| l.tokens).sum();
    let requests: usize = logs.iter().map(|l| l.requests).sum();
    let mut ttft: Vec<f64> = logs.iter().flat_map(|l| l.ttft.clone()).collect();
    let mut itl: Vec<f64> = logs.iter().flat_map(|l| l.itl.clone()).collect();
    json!({
        "clients": logs.len(),
        "seconds": seconds,
        "requests": requests,
        "tokens": tokens,
        "tokens_per_second": tokens as f64 / seconds,
        "ttft_ms": {"p50": percentile(&mut ttft, 50.0) * 1e3, "p99": percentile(&mut ttft, 99.0) * 1e3},
        "itl_ms": {"p50": percentile(&mut itl, 50.0) * 1e3, "p99": percentile(&mut itl, 99.0) * 1e3},
    })
}

/// 32 concurrent streaming clients for a minute: no errors, and continuous batching gives
/// at least 3× the tokens/s one client gets alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_two_streaming_clients_get_three_times_one_clients_tokens_per_second() {
    let seconds: f64 = std::env::var("MOERA_LOAD_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60.0);
    let server = TestServer::start_with(|config| {
        config.max_batch = CLIENTS;
        config.default_max_tokens = MAX_TOKENS;
    })
    .await;
    // Warm-up, then one client alone, then all of them.
    phase(&server, 1, 1.0).await;
    let (single_logs, single_seconds) = phase(&server, 1, (seconds / 4.0).max(5.0)).await;
    let before = server.state.scheduler_stats();
    let (logs, load_seconds) = phase(&server, CLIENTS, seconds).await;
    let after = server.state.scheduler_stats();
    let single = summary(&single_logs, single_seconds);
    let load = summary(&logs, load_seconds);
    let report = json!({
        "single": single,
        "concurrent": load,
        "speedup": load["tokens_per_second"].as_f64().unwrap_or(0.0)
            / single["tokens_per_second"].as_f64().unwrap_or(f64::INFINITY),
        // Sequences per shared decode step while the 32 clients ran.
        "concurrent_rows_per_decode_step": (after.decoded_rows - before.decoded_rows) as f64
            / (after.decode_steps - before.decode_steps).max(1) as f64,
    });
    println!("load: {report}");
    let errors: Vec<&String> = single_logs
        .iter()
        .chain(&logs)
        .flat_map(|l| &l.errors)
        .collect();
    assert!(
        errors.is_empty(),
        "{} errors, first: {:?}",
        errors.len(),
        errors.first()
    );
    assert!(
        logs.iter().all(|l| l.requests > 0 && l.tokens > 0),
        "every client got tokens"
    );
    let speedup = report["speedup"].as_f64().unwrap_or(0.0);
    assert!(
        speedup >= 3.0,
        "batching gave {speedup:.2}x one client's tokens/s: {report}"
    );
    let health = server.get("/health").await.1;
    assert_eq!(health["status"], "ok", "{health}");
}
