//! The `moera` binary, as users and the reference scripts call it.

use std::process::Command;

use crate::common::*;

/// Runs `moera` on flex and returns its output, failing the test when it fails.
pub fn moera(args: &[&str]) -> std::process::Output {
    let output = Command::new(env!("CARGO_BIN_EXE_moera"))
        .args(args)
        .env("MOERA_DEVICE", "flex")
        .output()
        .expect("run moera");
    assert!(
        output.status.success(),
        "moera {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// `moera logits` of the comma-separated `prompt` on the model at `dir`: shape and values.
fn cli_logits(dir: &std::path::Path, prompt: &str) -> (Vec<usize>, Vec<f32>) {
    let out_dir = scratch();
    let out = out_dir.path().join("logits.safetensors");
    moera(&[
        "logits",
        "--model",
        dir.to_str().unwrap(),
        "--prompt-ids",
        prompt,
        "--out",
        out.to_str().unwrap(),
    ]);
    let (shape, values) = crate::common::reference(&out)
        .remove("logits")
        .expect("logits");
    (shape, values.iter().map(|&v| v as f32).collect())
}

fn csv(ids: &[u32]) -> String {
    ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",")
}

#[test]
fn print_ids_gives_transformers_greedy_tokens() {
    let dir = fixtures().join("tiny-llama");
    let reference = reference(&dir.join("reference.safetensors"));
    let prompt = csv(&ids(&reference["prompt_ids"].1));
    let output = moera(&[
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--prompt-ids",
        &prompt,
        "--max-tokens",
        "16",
        "--temperature",
        "0",
        "--print-ids",
    ]);
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert_eq!(stdout.trim(), csv(&ids(&reference["greedy_ids"].1)));
}

#[test]
fn logits_file_matches_transformers() {
    let dir = fixtures().join("tiny-llama");
    let reference = reference(&dir.join("reference.safetensors"));
    let prompt = csv(&ids(&reference["prompt_ids"].1));
    let (shape, values) = cli_logits(&dir, &prompt);
    assert_eq!(shape, reference["logits"].0);
    assert!(max_abs_diff(&values, &reference["logits"].1) < 1e-4);
}

#[test]
fn unknown_model_is_a_clear_error() {
    let output = Command::new(env!("CARGO_BIN_EXE_moera"))
        .args(["generate", "--model", "/no/such/model", "hi"])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("not found"), "{stderr}");
}

#[test]
fn smollm2_perplexity_command() {
    if smollm2_path().is_none() {
        return;
    }
    let file = fixtures().join("english.txt");
    let output = moera(&[
        "perplexity",
        "--model",
        "smollm2",
        "--file",
        file.to_str().unwrap(),
        "--ctx",
        "128",
    ]);
    let stdout = String::from_utf8(output.stdout).unwrap();
    let value: f64 = stdout
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("unexpected output {stdout:?}"));
    let reference: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("smollm2_reference.json")).unwrap(),
    )
    .unwrap();
    let expected = reference["perplexity"]["perplexity"].as_f64().unwrap();
    assert!(
        (value - expected).abs() / expected < 0.005,
        "{value} vs {expected}"
    );
}

#[test]
fn interactive_chat_answers_from_stdin() {
    if smollm2_path().is_none() {
        return;
    }
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_moera"))
        .args(["chat", "--model", "smollm2", "--max-tokens", "24"])
        .env("MOERA_DEVICE", "flex")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"What is the capital of France?\n")
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert!(stdout.contains("Paris"), "{stdout:?}");
}

/// Deterministic, well-spread rows (no random crate needed).
fn rows(count: usize, dim: usize, seed: usize) -> Vec<f32> {
    (0..count * dim)
        .map(|i| ((i * 7919 + seed * 104_729) as f32 * 0.618_034).sin())
        .collect()
}

#[test]
fn index_build_and_query_return_the_brute_force_neighbours() {
    use moera::index::npy::{Matrix, read_matrix, write_matrix};
    let dir = tempfile::tempdir().unwrap();
    let (dim, base_rows, query_rows, k) = (16, 3000, 40, 10);
    let base = Matrix {
        rows: base_rows,
        cols: dim,
        data: rows(base_rows, dim, 1),
    };
    let queries = Matrix {
        rows: query_rows,
        cols: dim,
        data: rows(query_rows, dim, 2),
    };
    let path = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    write_matrix(dir.path().join("base.npy").as_path(), &base).unwrap();
    write_matrix(dir.path().join("queries.npy").as_path(), &queries).unwrap();
    let built = moera(&[
        "index",
        "build",
        "--npy",
        &path("base.npy"),
        "--out",
        &path("idx"),
        "--metric",
        "l2",
        "--threads",
        "2",
    ]);
    assert!(String::from_utf8_lossy(&built.stdout).contains("built 3000 points"));
    let queried = moera(&[
        "index",
        "query",
        "--index",
        &path("idx"),
        "--npy",
        &path("queries.npy"),
        "--k",
        "10",
        "--ef",
        "128",
        "--out",
        &path("ids.npy"),
    ]);
    let report = String::from_utf8_lossy(&queried.stdout);
    assert!(
        report.contains("opened 3000 points") && report.contains("QPS"),
        "{report}"
    );
    let ids = read_matrix::<i64>(dir.path().join("ids.npy").as_path()).unwrap();
    assert_eq!((ids.rows, ids.cols), (query_rows, k));
    let mut found = 0;
    for q in 0..query_rows {
        // Brute force: squared L2 to every base row.
        let mut exact: Vec<(f32, i64)> = (0..base_rows)
            .map(|b| {
                let d = queries
                    .row(q)
                    .iter()
                    .zip(base.row(b))
                    .map(|(x, y)| (x - y) * (x - y));
                (d.sum(), b as i64)
            })
            .collect();
        exact.sort_by(|a, b| a.0.total_cmp(&b.0));
        let exact: Vec<i64> = exact[..k].iter().map(|e| e.1).collect();
        found += ids.row(q).iter().filter(|id| exact.contains(id)).count();
    }
    let recall = found as f64 / (query_rows * k) as f64;
    assert!(recall >= 0.98, "recall@10 {recall}");

    // Bad input: a clear error and a failing exit status, never a panic.
    let fails = |args: &[&str], expected: &str| {
        let output = Command::new(env!("CARGO_BIN_EXE_moera"))
            .args(args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            !output.status.success() && stderr.contains(expected),
            "{args:?}: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
    };
    fails(
        &[
            "index",
            "build",
            "--npy",
            &path("base.npy"),
            "--out",
            &path("idx"),
        ],
        "already exists",
    );
    fails(
        &[
            "index",
            "query",
            "--index",
            &path("idx"),
            "--npy",
            &path("ids.npy"),
            "--out",
            &path("x.npy"),
        ],
        "<f4",
    );
    fails(
        &[
            "index",
            "query",
            "--index",
            &path("idx"),
            "--npy",
            &path("queries.npy"),
            "--k",
            "99999999999999",
            "--out",
            &path("x.npy"),
        ],
        "too large",
    );
    fails(
        &[
            "index",
            "query",
            "--index",
            &path("nowhere"),
            "--npy",
            &path("queries.npy"),
            "--out",
            &path("x.npy"),
        ],
        "no collection here",
    );
}

/// `logits` and `generate --prompt-ids --print-ids` on every MoE architecture (folders
/// without a tokenizer), against transformers; `--router-stats` prints one row per MoE layer.
#[test]
fn every_moe_architecture_through_the_cli() {
    for name in crate::moe_parity::MOE_FIXTURES {
        let dir = fixtures().join(name);
        let reference = reference(&dir.join("reference.safetensors"));
        let prompt = csv(&ids(&reference["prompt_ids"].1));
        let (_, values) = cli_logits(&dir, &prompt);
        let diff = max_abs_diff(&values, &reference["logits"].1);
        assert!(diff < 1e-4, "{name}: logits differ by {diff}");

        let output = moera(&[
            "generate",
            "--model",
            dir.to_str().unwrap(),
            "--prompt-ids",
            &prompt,
            "--max-tokens",
            "16",
            "--temperature",
            "0",
            "--print-ids",
            "--router-stats",
        ]);
        let stdout = String::from_utf8(output.stdout).unwrap();
        let mut lines = stdout.lines();
        assert_eq!(
            lines.next(),
            Some(csv(&ids(&reference["greedy_ids"].1)).as_str()),
            "{name}: greedy ids"
        );
        assert!(lines.next().unwrap_or("").starts_with("layer"), "{stdout}");
        let moe_layers = reference.keys().filter(|k| k.ends_with(".ids")).count();
        let rows: Vec<&str> = lines.collect();
        assert_eq!(rows.len(), moe_layers, "{name}: {stdout}");
        for row in rows {
            // prompt (12) + 15 tokens fed back, 2 experts each = 54 slots per layer.
            let slots: usize = row
                .split_whitespace()
                .skip(4)
                .map(|load| load.split(':').nth(1).unwrap().parse::<usize>().unwrap())
                .sum();
            assert_eq!(slots, 27 * 2, "{name}: {row}");
        }
    }
}

/// `perplexity` on an MoE folder that ships a tokenizer, against transformers' value.
#[test]
fn moe_perplexity_command_matches_transformers() {
    let dir = fixtures().join("tiny-qwen3-moe");
    let file = fixtures().join("english.txt");
    let output = moera(&[
        "perplexity",
        "--model",
        dir.to_str().unwrap(),
        "--file",
        file.to_str().unwrap(),
        "--ctx",
        "128",
    ]);
    let stdout = String::from_utf8(output.stdout).unwrap();
    let value: f64 = stdout
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("unexpected output {stdout:?}"));
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("perplexity.json")).unwrap())
            .unwrap();
    let expected = reference["perplexity"].as_f64().unwrap();
    assert!(
        (value - expected).abs() / expected < 1e-4,
        "{value} vs {expected}"
    );
}

/// `moera train` on tiny-qwen3-moe (its BPE tokenizer, prompt/completion data): LoRA for a
/// few steps with a JSONL event log and a held-out split, the adapter saved in PEFT's
/// format, then `moera logits --adapter` and `--merge-adapter` give the same logits; a
/// malformed line stops it with its line number.
#[test]
fn train_writes_an_adapter_that_logits_loads() {
    let dir = scratch();
    let data = dir.path().join("train.jsonl");
    let lines: Vec<String> = (0..12)
        .map(|i| {
            serde_json::json!({"prompt": format!("the number {i} is"), "completion": " small"})
                .to_string()
        })
        .collect();
    std::fs::write(&data, lines.join("\n")).unwrap();
    let model = fixtures().join("tiny-qwen3-moe");
    let out = dir.path().join("adapter");
    let log = dir.path().join("events.jsonl");
    let path = |p: &std::path::Path| p.to_str().unwrap().to_string();
    let output = moera(&[
        "train",
        "--model",
        &path(&model),
        "--data",
        &path(&data),
        "--strategy",
        "lora",
        "--r",
        "4",
        "--alpha",
        "8",
        "--lr",
        "1e-2",
        "--batch-size",
        "2",
        "--epochs",
        "2",
        "--validation",
        "0.25",
        "--eval-every",
        "2",
        "--checkpointing",
        "--out",
        &path(&out),
        "--log",
        &path(&log),
    ]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("adapter saved"), "{stdout}");
    assert!(out.join("adapter_config.json").exists());
    let events: Vec<serde_json::Value> = std::fs::read_to_string(&log)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let kinds: Vec<&str> = events
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    // 9 training examples, batches of 2, 2 epochs: 10 steps.
    assert_eq!(
        kinds.iter().filter(|k| **k == "step").count(),
        10,
        "{kinds:?}"
    );
    assert_eq!(kinds.first(), Some(&"started"));
    assert_eq!(kinds.last(), Some(&"finished"));
    assert!(kinds.contains(&"eval"));

    let logits = |extra: &[&str]| {
        let file = dir.path().join("logits.safetensors");
        let mut args = vec!["logits", "--model", model.to_str().unwrap()];
        args.extend_from_slice(extra);
        let file_arg = path(&file);
        args.extend_from_slice(&["--prompt-ids", "1,2,3,4", "--out", &file_arg]);
        moera(&args);
        crate::common::reference(&file).remove("logits").unwrap().1
    };
    let adapter_arg = path(&out);
    let adapted = logits(&["--adapter", &adapter_arg]);
    let merged = logits(&["--adapter", &adapter_arg, "--merge-adapter"]);
    let base = logits(&[]);
    let diff = |a: &[f64], b: &[f64]| a.iter().zip(b).fold(0f64, |m, (x, y)| m.max((x - y).abs()));
    assert!(
        diff(&adapted, &merged) < 1e-4,
        "merged differs by {}",
        diff(&adapted, &merged)
    );
    assert!(diff(&adapted, &base) > 1e-3, "the adapter changed nothing");

    std::fs::write(&data, format!("{}\n{{\"prompt\": 3}}\n", lines[0])).unwrap();
    let failed = Command::new(env!("CARGO_BIN_EXE_moera"))
        .args([
            "train",
            "--model",
            &path(&model),
            "--data",
            &path(&data),
            "--out",
            &path(&out),
        ])
        .env("MOERA_DEVICE", "flex")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert!(
        !failed.status.success() && stderr.contains("train.jsonl:2"),
        "{stderr}"
    );
}

/// `moera serve`: refuses a public address without a key, serves on loopback, and exits
/// cleanly on SIGTERM.
#[cfg(feature = "server")]
#[test]
fn serve_refuses_public_addresses_without_a_key_and_stops_on_sigterm() {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::process::Stdio;
    use std::time::{Duration, Instant};

    let model = crate::common::fixtures().join("tiny-chat");
    let model = model.to_str().expect("UTF-8 path");
    let refused = Command::new(env!("CARGO_BIN_EXE_moera"))
        .args([
            "serve", "--model", model, "--host", "0.0.0.0", "--port", "0",
        ])
        .env("MOERA_DEVICE", "flex")
        .env_remove("MOERA_API_KEY")
        .output()
        .expect("run moera serve");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "served publicly without a key");
    assert!(stderr.contains("without an API key"), "{stderr}");

    let mut server = Command::new(env!("CARGO_BIN_EXE_moera"))
        .args(["serve", "--model", model, "--port", "0"])
        .env("MOERA_DEVICE", "flex")
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .env_remove("MOERA_API_KEY")
        .stderr(Stdio::piped())
        .spawn()
        .expect("start moera serve");
    let mut lines = BufReader::new(server.stderr.take().expect("stderr")).lines();
    let addr = loop {
        let line = lines
            .next()
            .expect("the server logs its address")
            .expect("log line");
        if let Some(at) = line.find("listening on http://") {
            let rest = &line[at + "listening on http://".len()..];
            break rest
                .chars()
                .take_while(|c| c.is_ascii_digit() || matches!(c, '.' | ':'))
                .collect::<String>();
        }
    };
    // Keep draining the log so the server never blocks on a full pipe.
    std::thread::spawn(move || lines.for_each(drop));
    let mut stream = std::net::TcpStream::connect(&addr).expect("connect");
    stream
        .write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .expect("request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("response");
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert!(response.contains("\"status\":\"ok\""), "{response}");

    let killed = Command::new("kill")
        .args(["-TERM", &server.id().to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = server.try_wait().expect("wait") {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the server did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "exit status {status}");
}
