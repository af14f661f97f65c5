//! `moera index build` and `moera index query`: a vector index from and to `.npy` files.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Args, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use moera::index::npy::{Matrix, read_f32_matrix, read_matrix, write_matrix};
use moera::index::{
    Collection, CollectionConfig, DurableCollection, HnswParams, Metric, Point, Quantization,
};
use moera::process::{cpu_seconds, rss_mib};
use rayon::prelude::*;

#[derive(Subcommand)]
pub enum IndexCommand {
    /// Build an index from the rows of a 2-D f32 .npy file (point ids are row numbers).
    Build(BuildArgs),
    /// Search an index with the rows of a .npy file and write the ids of the nearest points.
    Query(QueryArgs),
}

#[derive(Clone, Copy, ValueEnum)]
enum MetricArg {
    Cosine,
    Dot,
    L2,
}

#[derive(Args)]
pub struct BuildArgs {
    /// Base vectors, shape (N, D), f32.
    #[arg(long)]
    npy: PathBuf,
    /// Directory of the new index.
    #[arg(long)]
    out: PathBuf,
    #[arg(long, value_enum, default_value = "cosine")]
    metric: MetricArg,
    /// Links per node (twice as many on layer 0).
    #[arg(long, default_value_t = 16)]
    m: usize,
    #[arg(long, default_value_t = 200)]
    ef_construction: usize,
    /// Keep int8 codes of the vectors for the graph walk (rescored in f32).
    #[arg(long)]
    int8: bool,
    /// Build threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
}

#[derive(Args)]
pub struct QueryArgs {
    /// Index directory written by `moera index build`.
    #[arg(long)]
    index: PathBuf,
    /// Queries, shape (Q, D), f32.
    #[arg(long)]
    npy: PathBuf,
    #[arg(long, default_value_t = 10)]
    k: usize,
    #[arg(long, default_value_t = 64)]
    ef: usize,
    /// Output: int64 ids, shape (Q, k), row i for query i (-1 where fewer than k points).
    #[arg(long)]
    out: PathBuf,
    /// Exact neighbour ids, shape (Q, ≥k), int64: prints recall@k when given.
    #[arg(long)]
    truth: Option<PathBuf>,
    /// Search threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
}

fn pool(threads: Option<usize>) -> Result<rayon::ThreadPool> {
    let mut builder = rayon::ThreadPoolBuilder::new();
    if let Some(threads) = threads {
        builder = builder.num_threads(threads);
    }
    Ok(builder.build()?)
}

pub fn run(command: IndexCommand) -> Result<()> {
    match command {
        IndexCommand::Build(args) => build(args),
        IndexCommand::Query(args) => query(args),
    }
}

fn build(args: BuildArgs) -> Result<()> {
    let base = read_f32_matrix(&args.npy)?;
    let config = CollectionConfig {
        dim: base.cols,
        metric: match args.metric {
            MetricArg::Cosine => Metric::Cosine,
            MetricArg::Dot => Metric::Dot,
            MetricArg::L2 => Metric::L2,
        },
        hnsw: HnswParams {
            m: args.m,
            ef_construction: args.ef_construction,
            ..HnswParams::default()
        },
        quantization: if args.int8 {
            Quantization::Int8
        } else {
            Quantization::None
        },
    };
    let bar = ProgressBar::new(base.rows as u64).with_style(ProgressStyle::with_template(
        "building {bar:40} {pos}/{len} points, {eta} left",
    )?);
    let (started, cpu_started) = (Instant::now(), cpu_seconds().unwrap_or_default());
    let mut collection = Collection::new(config);
    pool(args.threads)?.install(|| -> Result<()> {
        const STEP: usize = 10_000;
        for start in (0..base.rows).step_by(STEP) {
            let points: Vec<Point> = (start..(start + STEP).min(base.rows))
                .map(|row| Point {
                    id: row as u64,
                    vector: base.row(row).to_vec(),
                    payload: serde_json::Value::Null,
                })
                .collect();
            collection.upsert_batch(&points)?;
            bar.inc(points.len() as u64);
        }
        Ok(())
    })?;
    bar.finish_and_clear();
    let (build_s, build_cpu) = (
        started.elapsed().as_secs_f64(),
        cpu_seconds().unwrap_or_default() - cpu_started,
    );
    let written = Instant::now();
    DurableCollection::create_from(&args.out, collection)?;
    println!(
        "built {} points of dimension {} in {build_s:.2} s ({build_cpu:.1} CPU-s); wrote {} in {:.2} s",
        base.rows,
        base.cols,
        args.out.display(),
        written.elapsed().as_secs_f64()
    );
    Ok(())
}

fn query(args: QueryArgs) -> Result<()> {
    let queries = read_f32_matrix(&args.npy)?;
    let rss_before = rss_mib().unwrap_or_default();
    let started = Instant::now();
    let (store, _) = DurableCollection::open(&args.index)
        .with_context(|| format!("opening {}", args.index.display()))?;
    let open_ms = started.elapsed().as_secs_f64() * 1e3;
    let collection = store.collection();
    println!(
        "opened {} points in {open_ms:.1} ms (RSS +{:.1} MiB)",
        collection.count(),
        rss_mib().unwrap_or_default() - rss_before
    );
    if queries.cols != collection.config().dim {
        bail!(
            "queries have {} dimensions, the index {}",
            queries.cols,
            collection.config().dim
        );
    }
    let Some(id_count) = queries
        .rows
        .checked_mul(args.k)
        .filter(|_| args.k <= 1 << 20)
    else {
        bail!("--k {} is too large", args.k);
    };
    let pool = pool(args.threads)?;
    let started = Instant::now();
    let results = pool.install(|| {
        (0..queries.rows)
            .into_par_iter()
            .map(|row| collection.search(queries.row(row), args.k, args.ef, None))
            .collect::<Result<Vec<_>, _>>()
    })?;
    let secs = started.elapsed().as_secs_f64();
    let mut ids = Matrix {
        rows: queries.rows,
        cols: args.k,
        data: vec![-1i64; id_count],
    };
    for (row, hits) in results.iter().enumerate() {
        for (slot, hit) in ids.data[row * args.k..].iter_mut().zip(hits) {
            *slot = hit.id as i64;
        }
    }
    write_matrix(&args.out, &ids)?;
    println!(
        "{} queries, k {}, ef {}: {:.0} QPS on {} threads (RSS +{:.1} MiB since open)",
        queries.rows,
        args.k,
        args.ef,
        queries.rows as f64 / secs,
        pool.current_num_threads(),
        rss_mib().unwrap_or_default() - rss_before
    );
    if let Some(path) = &args.truth {
        let truth = read_matrix::<i64>(path)?;
        if truth.rows != queries.rows || truth.cols < args.k {
            bail!(
                "{} has shape ({}, {})",
                path.display(),
                truth.rows,
                truth.cols
            );
        }
        let found: usize = (0..queries.rows)
            .map(|row| {
                let exact = &truth.row(row)[..args.k];
                ids.row(row).iter().filter(|id| exact.contains(id)).count()
            })
            .sum();
        println!(
            "recall@{}: {:.4}",
            args.k,
            found as f64 / (queries.rows * args.k) as f64
        );
    }
    Ok(())
}
