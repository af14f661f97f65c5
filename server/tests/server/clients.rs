//! The official clients against the server: the `openai` Python package, and the web page
//! in headless Chromium (playwright-core). Each is skipped with a note where its tools are
//! missing, unless its `MOERA_REQUIRE_*` variable is 1.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::*;

fn required(variable: &str) -> bool {
    std::env::var(variable).is_ok_and(|v| v == "1")
}

fn skip(variable: &str, why: &str) {
    assert!(!required(variable), "{variable}=1 but {why}");
    eprintln!("SKIPPED: {why} (set {variable}=1 to make this a failure)");
}

fn manifest_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Runs `command` on a blocking thread (the server keeps serving) and fails with its
/// output unless it succeeds.
async fn run(mut command: Command, what: &str) {
    let output = tokio::task::spawn_blocking(move || command.output())
        .await
        .unwrap()
        .unwrap_or_else(|e| panic!("running {what}: {e}"));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    eprintln!("{what} stdout:\n{stdout}\n{what} stderr:\n{stderr}");
    assert!(output.status.success(), "{what} failed: {}", output.status);
}

fn python_has_openai() -> bool {
    Command::new("python3")
        .args(["-c", "import openai"])
        .output()
        .is_ok_and(|o| o.status.success())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_python_client() {
    if !python_has_openai() {
        return skip(
            "MOERA_REQUIRE_OPENAI",
            "python3 cannot import openai (pip install openai)",
        );
    }
    let embedder = minilm();
    let with_embedder = embedder.is_some();
    let server = TestServer::start_with(|config| config.embedder = embedder).await;
    let mut command = Command::new("python3");
    command
        .arg(manifest_dir().join("tests/openai_check.py"))
        .args(["--base-url", &server.url("/v1")])
        .args(["--api-key", KEY])
        .args(["--model", MODEL]);
    if with_embedder {
        command.args(["--embedding-model", "all-MiniLM-L6-v2"]);
    }
    run(command, "openai_check.py").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_web_page_in_chromium() {
    let chromium = Path::new("/usr/bin/chromium");
    let playwright = manifest_dir().join("tests/web/node_modules/playwright-core");
    if !chromium.exists() || !playwright.exists() {
        return skip(
            "MOERA_REQUIRE_CHROMIUM",
            "/usr/bin/chromium or server/tests/web/node_modules/playwright-core is missing",
        );
    }
    let server = TestServer::start_with(|config| config.default_max_tokens = 24).await;
    let out = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("web-page");
    std::fs::create_dir_all(&out).unwrap();
    let mut command = Command::new("node");
    command
        .arg(manifest_dir().join("tests/web/page_test.mjs"))
        .arg(format!("http://{}", server.addr))
        .arg(KEY)
        .arg(&out);
    run(command, "page_test.mjs").await;
    eprintln!("screenshots under {}", out.display());
}

/// The default real model, SmolLM2-135M-Instruct (GGUF Q4_1), behind the server: a chat
/// answer that knows the capital of France, then the official client's checks. Needs the
/// model cache (`scripts/fetch-models.sh smollm2`); `MOERA_REQUIRE_SMOLLM2=1` makes its
/// absence a failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smollm2_behind_the_openai_api() {
    let path = moera_engine::hub::resolve_model("smollm2");
    if !path.exists() {
        return skip(
            "MOERA_REQUIRE_SMOLLM2",
            "smollm2 is not in the model cache (scripts/fetch-models.sh smollm2)",
        );
    }
    let server = TestServer::start_with(|config| {
        config.models = vec![moera_server::ModelSpec::new("smollm2", path)];
        config.default_max_tokens = 16;
    })
    .await;
    let request = serde_json::json!({
        "model": "smollm2",
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 16,
        "temperature": 0,
    });
    let (status, body) = server.post("/v1/chat/completions", &request).await;
    assert_eq!(status, 200, "{body}");
    let answer = body["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default();
    assert!(answer.contains("Paris"), "SmolLM2 answered {answer:?}");

    if !python_has_openai() {
        return skip(
            "MOERA_REQUIRE_OPENAI",
            "python3 cannot import openai (pip install openai)",
        );
    }
    let mut command = Command::new("python3");
    command
        .arg(manifest_dir().join("tests/openai_check.py"))
        .args(["--base-url", &server.url("/v1")])
        .args(["--api-key", KEY])
        .args(["--model", "smollm2"]);
    run(command, "openai_check.py (SmolLM2)").await;
}
