//! Ingestion: a folder of text, Markdown and HTML files → chunks → embeddings → points of a
//! durable collection.
//!
//! Every chunk is a point whose payload holds `source` (the file's absolute path), `title`,
//! `chunk` (its index in the file), `chunks` (the file's count), `hash` (SHA-256 of the file's
//! bytes), `ingest` (the embedder and chunking that made it) and `text`. Ingesting a folder
//! again skips files whose hash and ingest settings are unchanged, replaces the chunks of
//! changed files (the new ones are written before the old ones are deleted, so a crash loses
//! nothing), and deletes the chunks of files that are gone.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use moera_index::{CollectionConfig, DurableCollection, Metric, Point};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::embed::Embedder;
use crate::error::{Error, Result};
use crate::rag::chunk::{ChunkOptions, chunk_text};
use crate::rag::extract::{Format, NoText, extract};

/// The folder of collection `name` under `data_dir`. Names are one path component of
/// letters, digits, `-`, `_` and `.` (not starting with a dot).
pub fn collection_dir(data_dir: &Path, name: &str) -> Result<PathBuf> {
    let valid = !name.is_empty()
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if !valid {
        return Err(Error::InvalidArgument(format!(
            "collection name {name:?}: use letters, digits, '-', '_' and '.'"
        )));
    }
    Ok(data_dir.join(name))
}

/// Opens collection `name`, creating it (cosine metric) when `create` is set and it does not
/// exist; refuses one whose vectors are not `dimension` long.
pub fn open_collection(
    data_dir: &Path,
    name: &str,
    dimension: usize,
    create: bool,
) -> Result<DurableCollection> {
    let dir = collection_dir(data_dir, name)?;
    let collection = match DurableCollection::open(&dir) {
        Ok((collection, _)) => collection,
        Err(moera_index::StoreError::NotFound(_)) if create => {
            DurableCollection::create(&dir, CollectionConfig::new(dimension, Metric::Cosine))?
        }
        Err(e) => return Err(e.into()),
    };
    let found = collection.collection().config().dim;
    if found != dimension {
        return Err(Error::DimensionMismatch {
            collection: dir,
            collection_dim: found,
            embedder_dim: dimension,
        });
    }
    Ok(collection)
}

/// A file ingestion passed over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedFile {
    pub path: PathBuf,
    pub reason: String,
}

/// What an ingestion did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IngestReport {
    /// Files of a readable format found.
    pub files: usize,
    /// New files ingested.
    pub added: usize,
    /// Changed files whose chunks were replaced.
    pub replaced: usize,
    /// Files whose content hash was unchanged.
    pub unchanged: usize,
    /// Files gone since the last ingestion, whose chunks were deleted.
    pub removed: usize,
    /// Files of other formats (by extension).
    pub ignored: usize,
    /// Binary, unreadable, empty or `noindex` files.
    pub skipped: Vec<SkippedFile>,
    pub chunks_written: usize,
    pub chunks_deleted: usize,
}

/// Progress of an ingestion, after each file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IngestProgress {
    pub files_done: usize,
    pub files_total: usize,
    pub chunks_written: usize,
}

/// What the collection holds of one source file.
struct Stored {
    /// `hash` and `ingest` of the chunks (all of them agree unless a crash interrupted a
    /// replacement; then none is trusted).
    fingerprint: Option<(String, String)>,
    ids: Vec<u64>,
}

/// The most tokens of a title embedded with each chunk; longer titles are cut.
const TITLE_TOKENS: usize = 32;

/// Ingests folders into a collection with one embedder.
pub struct Ingestor<'a> {
    embedder: &'a dyn Embedder,
    options: ChunkOptions,
    /// What made the chunks: re-ingesting with another embedder or chunking re-embeds.
    settings: String,
}

impl<'a> Ingestor<'a> {
    /// Chunks of `options` must fit, with a title line (at most 32 tokens) and the special
    /// tokens, in what the embedder reads.
    pub fn new(embedder: &'a dyn Embedder, options: ChunkOptions) -> Result<Self> {
        if options.max_tokens + TITLE_TOKENS + 3 > embedder.max_tokens() {
            return Err(Error::InvalidArgument(format!(
                "chunks of {} tokens and a title do not fit the embedder's {} tokens",
                options.max_tokens,
                embedder.max_tokens()
            )));
        }
        let settings = format!(
            "{} chunks {}/{}",
            embedder.name(),
            options.max_tokens,
            options.overlap_tokens
        );
        Ok(Self {
            embedder,
            options,
            settings,
        })
    }

    /// `title` cut to [`TITLE_TOKENS`] tokens.
    fn short_title(&self, title: String) -> Result<String> {
        let mut title = title;
        while self.embedder.token_count(&title)? > TITLE_TOKENS {
            let keep = title.chars().count() * 3 / 4;
            title = title.chars().take(keep).collect();
        }
        Ok(title)
    }

    /// Ingests `path` (a folder, walked recursively without hidden entries, or one file)
    /// into `collection`, calling `on_progress` after each file.
    pub fn ingest(
        &self,
        path: &Path,
        collection: &DurableCollection,
        on_progress: &mut dyn FnMut(IngestProgress),
    ) -> Result<IngestReport> {
        let root = std::fs::canonicalize(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let dimension = collection.collection().config().dim;
        if dimension != self.embedder.dimension() {
            return Err(Error::DimensionMismatch {
                collection: collection.dir().to_path_buf(),
                collection_dim: dimension,
                embedder_dim: self.embedder.dimension(),
            });
        }
        let mut report = IngestReport::default();
        let mut files = Vec::new();
        walk(&root, &mut files, &mut HashSet::new(), &mut report)?;
        // Chunks of files under a folder that could not be read are kept.
        let unreadable: Vec<PathBuf> = report.skipped.iter().map(|s| s.path.clone()).collect();
        let (mut stored, mut next_id) = stored_sources(collection);
        let total = files.len();
        report.files = total;
        for (done, (file, format)) in files.into_iter().enumerate() {
            let source = file.to_string_lossy().into_owned();
            let previous = stored.remove(&source);
            self.ingest_file(
                &file,
                &source,
                format,
                previous,
                collection,
                &mut next_id,
                &mut report,
            )?;
            on_progress(IngestProgress {
                files_done: done + 1,
                files_total: total,
                chunks_written: report.chunks_written,
            });
        }
        // What is left of the stored sources under `root` no longer exists (certainly: not
        // when a folder on its way could not be read).
        for (source, gone) in stored {
            let path = Path::new(&source);
            if path.starts_with(&root)
                && !unreadable.iter().any(|dir| path.starts_with(dir))
                && matches!(path.try_exists(), Ok(false))
            {
                report.removed += 1;
                report.chunks_deleted += delete(collection, &gone.ids)?;
            }
        }
        if report.chunks_written + report.chunks_deleted > 0 {
            collection.checkpoint()?;
        }
        Ok(report)
    }

    #[allow(clippy::too_many_arguments)]
    fn ingest_file(
        &self,
        file: &Path,
        source: &str,
        format: Format,
        previous: Option<Stored>,
        collection: &DurableCollection,
        next_id: &mut u64,
        report: &mut IngestReport,
    ) -> Result<()> {
        let skip = |report: &mut IngestReport, reason: String| {
            tracing::warn!(file = %file.display(), "skipped: {reason}");
            report.skipped.push(SkippedFile {
                path: file.to_path_buf(),
                reason,
            });
        };
        let bytes = match std::fs::read(file) {
            Ok(bytes) => bytes,
            Err(e) => {
                skip(report, format!("unreadable: {e}"));
                return Ok(());
            }
        };
        let hash = format!("{:x}", Sha256::digest(&bytes));
        let fingerprint = (hash.clone(), self.settings.clone());
        if previous
            .as_ref()
            .is_some_and(|p| p.fingerprint.as_ref() == Some(&fingerprint))
        {
            report.unchanged += 1;
            return Ok(());
        }
        let document = match extract(&bytes, format) {
            Ok(document) => document,
            Err(reason) => {
                let reason = match reason {
                    NoText::Binary => "binary (not UTF-8 text)",
                    NoText::NoIndex => "marked noindex",
                    NoText::Redirect => "a redirect",
                    NoText::Empty => "no text",
                };
                // The file's earlier chunks stay: it may be mid-write, or a mistake.
                skip(report, reason.to_string());
                return Ok(());
            }
        };
        let mut points = Vec::new();
        {
            let title = self.short_title(document.title.unwrap_or_else(|| {
                file.file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default()
            }))?;
            let count = |text: &str| self.embedder.token_count(text);
            let chunks = chunk_text(&document.text, self.options, &count)?;
            // The title rides along in the embedded text: chunks deep in a chapter rarely
            // repeat what the chapter is about.
            let embedded: Vec<String> = chunks.iter().map(|c| format!("{title}\n{c}")).collect();
            let refs: Vec<&str> = embedded.iter().map(String::as_str).collect();
            let vectors = self.embedder.embed(&refs)?;
            for (index, (text, vector)) in chunks.iter().zip(vectors).enumerate() {
                points.push(Point {
                    id: *next_id,
                    vector,
                    payload: json!({
                        "source": source,
                        "title": title,
                        "chunk": index,
                        "chunks": chunks.len(),
                        "hash": hash,
                        "ingest": self.settings,
                        "text": text,
                    }),
                });
                *next_id += 1;
            }
            collection.upsert_batch(&points)?;
            report.chunks_written += points.len();
        }
        if let Some(previous) = previous {
            report.chunks_deleted += delete(collection, &previous.ids)?;
            if !points.is_empty() {
                report.replaced += 1;
            }
        } else if !points.is_empty() {
            report.added += 1;
        }
        Ok(())
    }
}

fn delete(collection: &DurableCollection, ids: &[u64]) -> Result<usize> {
    let mut deleted = 0;
    for &id in ids {
        deleted += usize::from(collection.delete(id)?);
    }
    Ok(deleted)
}

/// The stored chunks by source, and the next free point id.
fn stored_sources(collection: &DurableCollection) -> (HashMap<String, Stored>, u64) {
    let collection = collection.collection();
    let mut sources: HashMap<String, Stored> = HashMap::new();
    let mut next_id = 0;
    let mut after = None;
    loop {
        let page = collection.scroll(after, 1024);
        let Some(last) = page.last() else { break };
        after = Some(last.id);
        for point in &page {
            next_id = next_id.max(point.id + 1);
            let field = |key: &str| point.payload.get(key).and_then(Value::as_str);
            if let Some(source) = field("source") {
                let fingerprint = field("hash").zip(field("ingest"));
                let fingerprint = fingerprint.map(|(h, i)| (h.to_string(), i.to_string()));
                match sources.entry(source.to_string()) {
                    Entry::Vacant(entry) => {
                        entry.insert(Stored {
                            fingerprint,
                            ids: vec![point.id],
                        });
                    }
                    Entry::Occupied(mut entry) => {
                        let stored = entry.get_mut();
                        if stored.fingerprint != fingerprint {
                            stored.fingerprint = None;
                        }
                        stored.ids.push(point.id);
                    }
                }
            }
        }
    }
    (sources, next_id)
}

/// Files under `path` in a readable format, sorted; hidden entries are left out and folders
/// reached twice through links are walked once.
fn walk(
    path: &Path,
    files: &mut Vec<(PathBuf, Format)>,
    visited: &mut HashSet<PathBuf>,
    report: &mut IngestReport,
) -> Result<()> {
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let metadata = std::fs::metadata(path).map_err(io)?;
    if metadata.is_file() {
        let format = path
            .extension()
            .and_then(|e| e.to_str())
            .and_then(Format::from_extension);
        match format {
            Some(format) => files.push((path.to_path_buf(), format)),
            None => report.ignored += 1,
        }
        return Ok(());
    }
    if !visited.insert(std::fs::canonicalize(path).map_err(io)?) {
        return Ok(());
    }
    let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
        .map_err(io)?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| !n.to_string_lossy().starts_with('.'))
        })
        .collect();
    entries.sort();
    for entry in entries {
        match walk(&entry, files, visited, report) {
            Ok(()) => {}
            // A broken link or a folder we may not read: count it, go on.
            Err(Error::Io { path, source }) => report.skipped.push(SkippedFile {
                path,
                reason: format!("unreadable: {source}"),
            }),
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
