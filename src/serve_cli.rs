//! `moera serve`: the HTTP server (OpenAI-compatible API, retrieval, training jobs, a web
//! page) until Ctrl-C or SIGTERM, then a graceful shutdown.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use moera::engine::DeviceKind;
use moera::engine::hub::resolve_model;
use moera::engine::rag::settings::{Secret, Settings};
use moera_server::{ModelSpec, ServerConfig};

#[derive(Args)]
pub struct ServeArgs {
    /// A model to serve, as [NAME=]PATH: a folder, .gguf file, alias (smollm2) or hub id
    /// (repeatable; requests without `model` go to the first). NAME defaults to the alias
    /// or the file's stem.
    #[arg(
        long = "model",
        short = 'm',
        required = true,
        value_name = "[NAME=]PATH"
    )]
    models: Vec<String>,
    /// A PEFT LoRA adapter served beside a model, chosen per request by `"model": NAME`
    /// (repeatable; MODEL defaults to the first model).
    #[arg(long = "adapter", value_name = "[MODEL:]NAME=DIR")]
    adapters: Vec<String>,
    /// Address to listen on (default: MOERA_BIND's, else 127.0.0.1).
    #[arg(long)]
    host: Option<String>,
    /// Port to listen on (default: MOERA_BIND's, else 8080).
    #[arg(long)]
    port: Option<u16>,
    /// Key clients must send as `Authorization: Bearer KEY` (default: MOERA_API_KEY).
    #[arg(long)]
    api_key: Option<String>,
    /// Allow listening on a non-loopback address without a key.
    #[arg(long)]
    insecure: bool,
    /// Sentence-transformers folder or alias for /v1/embeddings and retrieval (default:
    /// MOERA_EMBEDDER, else minilm, when it is present).
    #[arg(long)]
    embedder: Option<String>,
    /// Folder of the collections (default: MOERA_DATA_DIR, else $MOERA_HOME/collections).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Backend: flex (CPU), wgpu or cuda (default: MOERA_DEVICE, else the best built in).
    #[arg(long)]
    device: Option<String>,
    /// Sequences decoded together per model.
    #[arg(long, default_value_t = 32)]
    max_batch: usize,
    /// max_tokens of requests that give none.
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// An origin allowed to call the API from a browser (repeatable; `*` for any).
    #[arg(long = "cors-origin")]
    cors_origins: Vec<String>,
    /// Longest wait for a response to start.
    #[arg(long, default_value_t = 300)]
    request_timeout_secs: u64,
    /// Largest request body in bytes (default: MOERA_MAX_REQUEST_BYTES, else 1 MiB).
    #[arg(long)]
    max_request_bytes: Option<usize>,
}

/// Splits `[NAME=]PATH`; the default name is the alias as typed, else the file's stem.
fn model_spec(arg: &str) -> Result<ModelSpec> {
    let (name, target) = match arg.split_once('=') {
        Some((name, target)) if !name.is_empty() && !name.contains(['/', '\\']) => {
            (Some(name.to_string()), target)
        }
        _ => (None, arg),
    };
    let path = resolve_model(target);
    if !path.exists() {
        bail!(
            "model `{target}` not found (looked for {}); fetch the default models with scripts/fetch-models.sh",
            path.display()
        );
    }
    let name = name.unwrap_or_else(|| default_name(target));
    Ok(ModelSpec::new(name, path))
}

fn default_name(typed: &str) -> String {
    if !Path::new(typed).exists() && !typed.contains('/') {
        return typed.to_string();
    }
    let path = Path::new(typed);
    let stem = if path.is_dir() {
        path.file_name()
    } else {
        path.file_stem()
    };
    stem.map(|s| s.to_string_lossy().into_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| path.display().to_string())
}

/// Splits `[MODEL:]NAME=DIR`.
fn adapter_arg(arg: &str) -> Result<(Option<String>, String, PathBuf)> {
    let (left, dir) = arg
        .split_once('=')
        .with_context(|| format!("--adapter {arg}: expected [MODEL:]NAME=DIR"))?;
    let (model, name) = match left.split_once(':') {
        Some((model, name)) => (Some(model.to_string()), name.to_string()),
        None => (None, left.to_string()),
    };
    if name.is_empty() || dir.is_empty() {
        bail!("--adapter {arg}: expected [MODEL:]NAME=DIR");
    }
    Ok((model, name, PathBuf::from(dir)))
}

fn address(host: &str, port: u16) -> Result<SocketAddr> {
    (host, port)
        .to_socket_addrs()
        .with_context(|| format!("--host {host}"))?
        .next()
        .with_context(|| format!("--host {host}: no address"))
}

fn config(args: &ServeArgs) -> Result<ServerConfig> {
    let settings = Settings::from_env()?;
    let mut models = args
        .models
        .iter()
        .map(|arg| model_spec(arg))
        .collect::<Result<Vec<_>>>()?;
    for arg in &args.adapters {
        let (model, name, dir) = adapter_arg(arg)?;
        let spec = match &model {
            Some(model) => models
                .iter_mut()
                .find(|spec| &spec.name == model)
                .with_context(|| format!("--adapter {arg}: no model named {model}"))?,
            None => &mut models[0],
        };
        spec.adapters.push((name, dir));
    }
    let mut config = ServerConfig::from_settings(&settings, models);
    config.addr = match (&args.host, args.port) {
        (None, None) => settings.bind,
        (host, port) => {
            let host = host
                .clone()
                .unwrap_or_else(|| settings.bind.ip().to_string());
            address(&host, port.unwrap_or(settings.bind.port()))?
        }
    };
    if let Some(key) = &args.api_key {
        config.api_key = Some(Secret::new(key.clone()));
    }
    config.insecure = args.insecure;
    if let Some(device) = args.device.as_deref() {
        config.device = Some(device.parse::<DeviceKind>()?);
    }
    config.embedder = match &args.embedder {
        Some(name) => {
            let path = resolve_model(name);
            if !path.exists() {
                bail!(
                    "embedder `{name}` not found (looked for {})",
                    path.display()
                );
            }
            Some(path)
        }
        None => {
            let path = resolve_model(&settings.embedder);
            if path.exists() {
                Some(path)
            } else {
                tracing::info!(
                    embedder = %settings.embedder,
                    "no embedder found: /v1/embeddings and retrieval are off"
                );
                None
            }
        }
    };
    if let Some(dir) = &args.data_dir {
        config.data_dir = dir.clone();
    }
    config.max_batch = args.max_batch;
    config.default_max_tokens = args.max_tokens;
    config.cors_origins = args.cors_origins.clone();
    config.request_timeout = Duration::from_secs(args.request_timeout_secs.max(1));
    if let Some(bytes) = args.max_request_bytes {
        config.max_request_bytes = bytes;
    }
    Ok(config)
}

/// Completes on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::warn!("cannot listen for Ctrl-C: {e}");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(e) => {
                tracing::warn!("cannot listen for SIGTERM: {e}");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = terminate => {}
    }
}

pub fn serve(args: &ServeArgs) -> Result<()> {
    let config = config(args)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(moera_server::serve(config, shutdown_signal()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adapter_args_name_their_model() {
        let (model, name, dir) = adapter_arg("base:sql=adapters/sql").unwrap();
        assert_eq!(model.as_deref(), Some("base"));
        assert_eq!(name, "sql");
        assert_eq!(dir, PathBuf::from("adapters/sql"));
        let (model, name, _) = adapter_arg("sql=adapters/sql").unwrap();
        assert_eq!((model, name.as_str()), (None, "sql"));
        assert!(adapter_arg("sql").is_err());
    }

    #[test]
    fn default_names() {
        assert_eq!(default_name("smollm2"), "smollm2");
        assert_eq!(default_name("org/name"), "name");
        assert_eq!(default_name("tests/fixtures/tiny-llama"), "tiny-llama");
        assert_eq!(
            default_name("tests/fixtures/tiny-mixtral.gguf"),
            "tiny-mixtral"
        );
    }
}
