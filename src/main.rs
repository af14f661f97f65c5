//! The `moera` command line.

mod index_cli;
mod rag_cli;
#[cfg(feature = "server")]
mod serve_cli;
mod train_cli;

use std::io::{BufRead, Write};
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use moera::engine::hub::resolve_model;
use moera::engine::{
    ChatMessage, DeviceKind, GenerationRequest, LoadOptions, Model, Prompt, SamplingParams,
    TokenEvent,
};

mod allocator;

#[derive(Parser)]
#[command(
    name = "moera",
    version,
    about = "Run Mixture-of-Experts and dense language models"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Continue a prompt (or a chat message with --chat), streaming the text.
    Generate(GenerateArgs),
    /// Chat interactively with the model.
    Chat(ChatArgs),
    /// Write the logits of every prompt position to a safetensors file.
    Logits(LogitsArgs),
    /// Perplexity of a text file, over consecutive windows of --ctx tokens.
    Perplexity(PerplexityArgs),
    /// Fine-tune a model (LoRA or full) on a JSONL file.
    Train(Box<train_cli::TrainArgs>),
    /// Build or query a vector index.
    #[command(subcommand)]
    Index(index_cli::IndexCommand),
    /// Add a folder of .txt, .md and .html files to a collection (changed files replace
    /// their chunks, unchanged ones are skipped).
    Ingest(rag_cli::IngestArgs),
    /// Retrieve and rerank the passages of a collection that answer a question.
    Search(rag_cli::SearchArgs),
    /// Answer a question from a collection, citing the passages used.
    Ask(Box<rag_cli::AskArgs>),
    /// Serve models over HTTP: an OpenAI-compatible API, retrieval, training jobs and a
    /// web page.
    #[cfg(feature = "server")]
    Serve(Box<serve_cli::ServeArgs>),
}

#[derive(Args)]
struct ModelArgs {
    /// Model folder, .gguf file, alias (smollm2) or hub id found in the local HF cache.
    #[arg(long, short)]
    model: String,
    /// Backend: flex (CPU), wgpu or cuda. Defaults to cuda when built in, else flex.
    #[arg(long)]
    device: Option<String>,
    /// Linear weights: auto (GGUF blocks as stored; float weights to int4 above 20B
    /// parameters, int8 above 7B), none (all f32), int8 or int4.
    #[arg(long, default_value = "auto")]
    quant: String,
    /// A PEFT LoRA adapter folder (adapter_config.json, adapter_model.safetensors).
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Fold the adapter into the weights at load (the adapted layers become f32, or are
    /// quantized again with --quant int8/int4).
    #[arg(long, requires = "adapter")]
    merge_adapter: bool,
}

#[derive(Args)]
struct SamplingArgs {
    /// 0 is greedy.
    #[arg(long)]
    temperature: Option<f32>,
    #[arg(long)]
    top_k: Option<usize>,
    #[arg(long)]
    top_p: Option<f32>,
    #[arg(long)]
    min_p: Option<f32>,
    #[arg(long)]
    repetition_penalty: Option<f32>,
    #[arg(long)]
    seed: Option<u64>,
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// Stop before this string (repeatable).
    #[arg(long)]
    stop: Vec<String>,
}

impl SamplingArgs {
    fn params(&self, defaults: &SamplingParams) -> SamplingParams {
        let mut p = defaults.clone();
        if let Some(t) = self.temperature {
            p.temperature = t;
        }
        if let Some(k) = self.top_k {
            p.top_k = k;
        }
        if let Some(v) = self.top_p {
            p.top_p = v;
        }
        if let Some(v) = self.min_p {
            p.min_p = v;
        }
        if let Some(v) = self.repetition_penalty {
            p.repetition_penalty = v;
        }
        p.seed = self.seed.or(p.seed);
        p
    }
}

#[derive(Args)]
struct GenerateArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// The prompt text.
    prompt: Option<String>,
    /// Comma-separated token ids instead of text.
    #[arg(long, value_delimiter = ',')]
    prompt_ids: Option<Vec<u32>>,
    /// Apply the model's chat template (the prompt is a user message).
    #[arg(long)]
    chat: bool,
    /// Optional system message with --chat.
    #[arg(long)]
    system: Option<String>,
    /// Print the generated token ids, comma-separated on one line, instead of text.
    #[arg(long)]
    print_ids: bool,
    /// After generating, print a table of expert load per MoE layer (prompt and output).
    #[arg(long)]
    router_stats: bool,
}

#[derive(Args)]
struct ChatArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    sampling: SamplingArgs,
    #[arg(long)]
    system: Option<String>,
}

#[derive(Args)]
struct LogitsArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long, value_delimiter = ',')]
    prompt_ids: Option<Vec<u32>>,
    /// Text to tokenize (with the model's special tokens) instead of --prompt-ids.
    #[arg(long)]
    prompt: Option<String>,
    #[arg(long)]
    out: PathBuf,
}

#[derive(Args)]
struct PerplexityArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[arg(long)]
    file: PathBuf,
    #[arg(long, default_value_t = 512)]
    ctx: usize,
}

/// The backend `device` names (or the default one) and the path of model `model`.
pub(crate) fn device_and_model(
    device: Option<&str>,
    model: &str,
) -> Result<(DeviceKind, moera::engine::Device, PathBuf)> {
    let kind = match device {
        Some(name) => name.parse::<DeviceKind>()?,
        None => DeviceKind::default_kind()?,
    };
    let path = resolve_model(model);
    if !path.exists() {
        bail!(
            "model `{model}` not found (looked for {}); fetch the default models with scripts/fetch-models.sh",
            path.display()
        );
    }
    Ok((kind, kind.device()?, path))
}

fn load(args: &ModelArgs) -> Result<Model> {
    let (kind, device, path) = device_and_model(args.device.as_deref(), &args.model)?;
    let bar = ProgressBar::new(0).with_style(
        ProgressStyle::with_template("loading {msg} [{bar:30}] {pos}/{len} layers")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_message(
        path.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
    );
    let started = std::time::Instant::now();
    let options = LoadOptions {
        quantization: args.quant.parse()?,
        adapter: args.adapter.clone(),
        merge_adapter: args.merge_adapter,
        ..Default::default()
    };
    let model = Model::load_with(&path, &device, options, &mut |p| {
        bar.set_length(p.total as u64);
        bar.set_position(p.done as u64);
    })
    .with_context(|| format!("loading {}", path.display()))?;
    bar.finish_and_clear();
    tracing::info!(
        architecture = model.architecture(),
        device = %kind,
        seconds = started.elapsed().as_secs_f32(),
        "model loaded"
    );
    Ok(model)
}

fn stream(model: &Model, request: &GenerationRequest, print_ids: bool) -> Result<()> {
    let mut out = std::io::stdout().lock();
    let mut ids = Vec::new();
    let started = std::time::Instant::now();
    let mut generation = model.generate(request)?;
    for event in generation.by_ref() {
        match event? {
            TokenEvent::Token { id, text } => {
                ids.push(id.to_string());
                if !print_ids {
                    write!(out, "{text}")?;
                    out.flush()?;
                }
            }
            TokenEvent::Done { reason, usage } => {
                if print_ids {
                    writeln!(out, "{}", ids.join(","))?;
                } else {
                    writeln!(out)?;
                }
                let secs = started.elapsed().as_secs_f64();
                tracing::info!(
                    ?reason,
                    prompt_tokens = usage.prompt_tokens,
                    completion_tokens = usage.completion_tokens,
                    tokens_per_second = usage.completion_tokens as f64 / secs,
                    "generation finished"
                );
            }
        }
    }
    if let Some(trace) = generation.router_trace() {
        if trace.layers.is_empty() {
            writeln!(
                out,
                "router stats: {} has no MoE layers",
                model.architecture()
            )?;
        } else {
            write!(out, "{}", trace.load_table())?;
        }
    }
    Ok(())
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Index(command) => index_cli::run(command),
        Command::Train(args) => train_cli::train(&args),
        Command::Ingest(args) => rag_cli::ingest(&args),
        Command::Search(args) => rag_cli::search(&args),
        Command::Ask(args) => rag_cli::ask(&args),
        #[cfg(feature = "server")]
        Command::Serve(args) => serve_cli::serve(&args),
        Command::Generate(args) => {
            let model = load(&args.model)?;
            let prompt = match (&args.prompt_ids, &args.prompt) {
                (Some(ids), _) => Prompt::Ids(ids.clone()),
                (None, Some(text)) if args.chat => {
                    let mut messages = Vec::new();
                    if let Some(system) = &args.system {
                        messages.push(ChatMessage::system(system));
                    }
                    messages.push(ChatMessage::user(text));
                    Prompt::Chat(messages)
                }
                (None, Some(text)) => Prompt::Text(text.clone()),
                (None, None) => bail!("give a prompt or --prompt-ids"),
            };
            let request = GenerationRequest::new(prompt)
                .max_tokens(args.sampling.max_tokens)
                .sampling(args.sampling.params(&model.default_sampling))
                .stop(args.sampling.stop.clone())
                .record_routing(args.router_stats);
            stream(&model, &request, args.print_ids)
        }
        Command::Chat(args) => {
            let model = load(&args.model)?;
            let mut messages: Vec<ChatMessage> =
                args.system.iter().map(ChatMessage::system).collect();
            let stdin = std::io::stdin();
            eprintln!(
                "chatting with {} (empty line or Ctrl-D to quit)",
                model.path().display()
            );
            loop {
                eprint!("> ");
                let mut line = String::new();
                if stdin.lock().read_line(&mut line)? == 0 || line.trim().is_empty() {
                    break;
                }
                messages.push(ChatMessage::user(line.trim_end()));
                let request = GenerationRequest::chat(messages.clone())
                    .max_tokens(args.sampling.max_tokens)
                    .sampling(args.sampling.params(&model.default_sampling))
                    .stop(args.sampling.stop.clone());
                let mut reply = String::new();
                let mut out = std::io::stdout().lock();
                for event in model.generate(&request)? {
                    if let TokenEvent::Token { text, .. } = event? {
                        reply.push_str(&text);
                        write!(out, "{text}")?;
                        out.flush()?;
                    }
                }
                writeln!(out)?;
                messages.push(ChatMessage::assistant(reply));
            }
            Ok(())
        }
        Command::Logits(args) => {
            let model = load(&args.model)?;
            let ids = match (args.prompt_ids, args.prompt) {
                (Some(ids), _) => ids,
                (None, Some(text)) => model.encode(&text, true)?,
                (None, None) => bail!("give --prompt-ids or --prompt"),
            };
            let logits = model.logits(&ids)?;
            let shape = vec![ids.len(), model.vocab_size()];
            moera::engine::safetensors_source::write_f32(
                &args.out,
                &[("logits".into(), shape, logits)],
            )?;
            eprintln!(
                "wrote logits [{}, {}] to {}",
                ids.len(),
                model.vocab_size(),
                args.out.display()
            );
            Ok(())
        }
        Command::Perplexity(args) => {
            let model = load(&args.model)?;
            let text = std::fs::read_to_string(&args.file)
                .with_context(|| format!("reading {}", args.file.display()))?;
            let ids = model.encode(&text, true)?;
            let report = model.perplexity(&ids, args.ctx)?;
            println!(
                "perplexity: {:.4} ({} tokens scored of {}, ctx {})",
                report.perplexity,
                report.tokens_scored,
                ids.len(),
                args.ctx
            );
            Ok(())
        }
    }
}

fn main() {
    allocator::keep_freed_memory();
    let cli = Cli::parse();
    // A server logs its address and its requests; the other commands only warnings.
    #[cfg(feature = "server")]
    let default_filter = match cli.command {
        Command::Serve(_) => "warn,moera_server=info,tower_http=info",
        _ => "warn",
    };
    #[cfg(not(feature = "server"))]
    let default_filter = "warn";
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter)),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = run(cli) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
