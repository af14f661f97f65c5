//! The `moera` binary, as users and the reference scripts call it.

use std::process::Command;

use crate::common::*;

fn moera(args: &[&str]) -> std::process::Output {
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
    let out_dir = scratch();
    let out = out_dir.path().join("logits.safetensors");
    moera(&[
        "logits",
        "--model",
        dir.to_str().unwrap(),
        "--prompt-ids",
        &prompt,
        "--out",
        out.to_str().unwrap(),
    ]);
    let written = crate::common::reference(&out);
    let (shape, values) = &written["logits"];
    assert_eq!(shape, &reference["logits"].0);
    let values: Vec<f32> = values.iter().map(|&v| v as f32).collect();
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
