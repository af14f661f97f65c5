//! Durable collections: a checkpoint file plus a write-ahead log.
//!
//! Every upsert or delete is appended to `wal.log` and synced to disk before it is applied
//! and acknowledged, so a crash at any point (kill -9) loses no acknowledged write: opening
//! maps `collection.bin` and replays the log. A record torn by a crash can only be the last
//! one; it is cut off and reported. Every record and every section of the checkpoint carries
//! a CRC32, so corruption anywhere else is an error naming the file, never wrong results.
//!
//! `collection.bin` is laid out to be memory-mapped, not parsed: a header page (sizes, graph
//! parameters and a table of sections with their checksums), then one page-aligned section
//! per array of the collection (vectors, layer-0 links, levels, upper links, int8 codes and
//! ranges, point ids, live flags, payload ends and text, and the id index). Opening checks
//! the section checksums by streaming the file through a small buffer (the pages go to the
//! page cache, not into the process) and then maps each section copy-on-write, so a search
//! touches only the pages it needs. `checkpoint` writes a new file beside the old one,
//! renames it into place, maps it and then empties the log; replaying a log over a newer
//! checkpoint is harmless, because upserts and deletes are idempotent.
//!
//! A [`DurableCollection`] is `Send + Sync`: any number of threads search it while one
//! writer at a time upserts. An upsert holds the log while it syncs and the collection
//! shared while it searches the graph for the new links, and exclusively only to add them.

use std::fs::File;
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use rayon::prelude::*;
use serde_json::Value;

use crate::collection::{Collection, CollectionConfig, Point, Quantization};
use crate::column::Column;
use crate::hnsw::{GraphColumns, Hnsw};
use crate::quant::ScalarQuantizer;
use crate::{HnswParams, IndexError, Metric};

#[cfg(target_endian = "big")]
compile_error!("collection files hold little-endian arrays that are mapped as they are");

const CHECKPOINT: &str = "collection.bin";
const WAL: &str = "wal.log";
const MAGIC: &[u8; 8] = b"MOERAIDX";
const VERSION: u32 = 2;
const PAGE: u64 = 4096;
const SECTIONS: [&str; 13] = [
    "vectors",
    "layer0",
    "levels",
    "upper",
    "codes",
    "code_low",
    "code_step",
    "point_ids",
    "live",
    "payload_ends",
    "payloads",
    "sorted_ids",
    "sorted_nodes",
];
/// Fixed header fields before the section table.
const HEADER_FIELDS: usize = 40;
const HEADER_LEN: usize = HEADER_FIELDS + SECTIONS.len() * 20;

/// Errors of durable collections.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("{0}: no collection here (collection.bin is missing)")]
    NotFound(PathBuf),
    #[error("{0}: a collection already exists here")]
    AlreadyExists(PathBuf),
    #[error(transparent)]
    Index(#[from] IndexError),
}

type Result<T> = std::result::Result<T, StoreError>;

fn io(path: &Path) -> impl Fn(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn corrupt(path: &Path, reason: impl Into<String>) -> StoreError {
    StoreError::Corrupt {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// What opening a collection found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OpenReport {
    /// Log records applied on top of the checkpoint.
    pub replayed: usize,
    /// Bytes of a torn last record that were cut off (a crash during a write).
    pub truncated_bytes: u64,
}

/// How to open a collection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenOptions {
    /// Check every section's checksum before mapping it (default). Without it, opening
    /// reads only the header page, and damage inside a section goes unnoticed.
    pub verify_checksums: bool,
}

impl Default for OpenOptions {
    fn default() -> Self {
        Self {
            verify_checksums: true,
        }
    }
}

/// What a compaction reclaimed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompactReport {
    pub nodes_before: usize,
    pub nodes_after: usize,
}

/// A collection kept durable on disk; see the [module documentation](self).
pub struct DurableCollection {
    dir: PathBuf,
    state: RwLock<Collection>,
    /// The log; holding it makes its holder the one writer.
    wal: Mutex<File>,
}

#[derive(Debug, PartialEq)]
enum Record {
    Upsert {
        id: u64,
        vector: Vec<f32>,
        payload: Value,
    },
    Delete {
        id: u64,
    },
}

impl Record {
    fn encode(&self) -> Vec<u8> {
        let mut body = Vec::new();
        match self {
            Record::Upsert {
                id,
                vector,
                payload,
            } => {
                body.push(1);
                body.extend(id.to_le_bytes());
                let payload = payload.to_string();
                body.extend((payload.len() as u32).to_le_bytes());
                body.extend(payload.as_bytes());
                body.extend(vector.iter().flat_map(|v| v.to_le_bytes()));
            }
            Record::Delete { id } => {
                body.push(2);
                body.extend(id.to_le_bytes());
            }
        }
        let mut out = Vec::with_capacity(body.len() + 8);
        out.extend((body.len() as u32).to_le_bytes());
        out.extend(crc32fast::hash(&body).to_le_bytes());
        out.extend(body);
        out
    }

    fn decode(body: &[u8], dim: usize) -> Option<Record> {
        let id = le_u64(body, 1)?;
        match body.first()? {
            1 => {
                let len = le_u32(body, 9)? as usize;
                let payload = serde_json::from_slice(body.get(13..13 + len)?).ok()?;
                let raw = body.get(13 + len..)?;
                if raw.len() != dim * 4 {
                    return None;
                }
                let vector = raw
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect();
                Some(Record::Upsert {
                    id,
                    vector,
                    payload,
                })
            }
            2 if body.len() == 9 => Some(Record::Delete { id }),
            _ => None,
        }
    }
}

impl DurableCollection {
    /// Creates an empty collection in `dir` (created if needed).
    pub fn create(dir: impl AsRef<Path>, config: CollectionConfig) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        if dir.join(CHECKPOINT).exists() {
            return Err(StoreError::AlreadyExists(dir));
        }
        Self::create_from(dir, Collection::new(config))
    }

    /// Writes `collection` as a new durable collection in `dir`: how a bulk build (all
    /// points known up front) becomes a store without a log of every point.
    pub fn create_from(dir: impl AsRef<Path>, collection: Collection) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        if dir.join(CHECKPOINT).exists() {
            return Err(StoreError::AlreadyExists(dir));
        }
        write_checkpoint(&dir, &collection)?;
        let collection = read_checkpoint(&dir.join(CHECKPOINT), false)?;
        let wal_path = dir.join(WAL);
        let wal = open_log(&wal_path, true)?;
        wal.sync_all().map_err(io(&wal_path))?;
        Ok(Self {
            dir,
            state: RwLock::new(collection),
            wal: Mutex::new(wal),
        })
    }

    /// Opens a collection: maps the checkpoint (after checking its checksums) and replays
    /// the log.
    pub fn open(dir: impl AsRef<Path>) -> Result<(Self, OpenReport)> {
        Self::open_with(dir, OpenOptions::default())
    }

    pub fn open_with(dir: impl AsRef<Path>, options: OpenOptions) -> Result<(Self, OpenReport)> {
        let dir = dir.as_ref().to_path_buf();
        if !dir.join(CHECKPOINT).exists() {
            return Err(StoreError::NotFound(dir));
        }
        let mut collection = read_checkpoint(&dir.join(CHECKPOINT), options.verify_checksums)?;
        let wal_path = dir.join(WAL);
        let mut wal = open_log(&wal_path, false)?;
        let mut bytes = Vec::new();
        wal.read_to_end(&mut bytes).map_err(io(&wal_path))?;
        let dim = collection.config().dim;
        let mut report = OpenReport::default();
        let mut upserts = Vec::new();
        let replay_error =
            |e: IndexError| corrupt(&wal_path, format!("a record cannot be replayed: {e}"));
        let mut at = 0usize;
        while at < bytes.len() {
            let len = le_u32(&bytes, at).map(|len| len as usize);
            let crc = le_u32(&bytes, at + 4);
            let body = len.and_then(|len| bytes.get(at + 8..at + 8 + len));
            let end = at + 8 + len.unwrap_or(0);
            let valid =
                matches!((crc, body), (Some(crc), Some(body)) if crc == crc32fast::hash(body));
            if !valid {
                // Only the last record can be torn by a crash; damage before it is corruption.
                if body.is_some() && end < bytes.len() {
                    return Err(corrupt(
                        &wal_path,
                        format!("record at byte {at} fails its checksum"),
                    ));
                }
                report.truncated_bytes = (bytes.len() - at) as u64;
                wal.set_len(at as u64).map_err(io(&wal_path))?;
                wal.sync_all().map_err(io(&wal_path))?;
                break;
            }
            let record = Record::decode(body.unwrap_or_default(), dim)
                .ok_or_else(|| corrupt(&wal_path, format!("record at byte {at} is malformed")))?;
            // Consecutive upserts are replayed as one batch, which plans in parallel.
            match record {
                Record::Upsert {
                    id,
                    vector,
                    payload,
                } => upserts.push(Point {
                    id,
                    vector,
                    payload,
                }),
                Record::Delete { id } => {
                    collection.upsert_batch(&upserts).map_err(replay_error)?;
                    upserts.clear();
                    collection.delete(id);
                }
            }
            report.replayed += 1;
            at = end;
        }
        collection.upsert_batch(&upserts).map_err(replay_error)?;
        Ok((
            Self {
                dir,
                state: RwLock::new(collection),
                wal: Mutex::new(wal),
            },
            report,
        ))
    }

    /// Shared access to the collection, for searches and reads; writers wait while it is held.
    pub fn collection(&self) -> RwLockReadGuard<'_, Collection> {
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn collection_mut(&self) -> RwLockWriteGuard<'_, Collection> {
        self.state.write().unwrap_or_else(PoisonError::into_inner)
    }

    fn writer(&self) -> MutexGuard<'_, File> {
        self.wal.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn log(&self, wal: &mut File, records: &[Record]) -> Result<()> {
        let path = self.dir.join(WAL);
        let bytes: Vec<u8> = records.iter().flat_map(Record::encode).collect();
        wal.write_all(&bytes).map_err(io(&path))?;
        wal.sync_data().map_err(io(&path))
    }

    /// Inserts or replaces a point; durable when this returns.
    pub fn upsert(&self, id: u64, vector: &[f32], payload: Value) -> Result<()> {
        self.upsert_batch(&[Point {
            id,
            vector: vector.to_vec(),
            payload,
        }])
    }

    /// Several upserts with a single disk sync.
    pub fn upsert_batch(&self, points: &[Point]) -> Result<()> {
        let dim = self.collection().config().dim;
        for point in points {
            if point.vector.len() != dim {
                return Err(IndexError::Dimension {
                    expected: dim,
                    found: point.vector.len(),
                }
                .into());
            }
            if !point.vector.iter().all(|v| v.is_finite()) {
                return Err(IndexError::NonFinite.into());
            }
        }
        let records: Vec<Record> = points
            .iter()
            .map(|p| Record::Upsert {
                id: p.id,
                vector: p.vector.clone(),
                payload: p.payload.clone(),
            })
            .collect();
        let mut wal = self.writer();
        self.log(&mut wal, &records)?;
        let mut rest = points;
        while !rest.is_empty() {
            let chunk_size = self.collection().graph().chunk_size().min(rest.len());
            let (chunk, tail) = rest.split_at(chunk_size);
            let plans = self.collection().plan_upserts(chunk)?;
            self.collection_mut().apply_upserts(chunk, plans)?;
            rest = tail;
        }
        self.collection_mut().quantize_when_due();
        Ok(())
    }

    /// Deletes a point; durable when this returns. Returns whether it existed.
    pub fn delete(&self, id: u64) -> Result<bool> {
        let mut wal = self.writer();
        let existed = self.collection().get(id).is_some();
        self.log(&mut wal, &[Record::Delete { id }])?;
        self.collection_mut().delete(id);
        Ok(existed)
    }

    /// Writes `collection` as the checkpoint, maps it in place of the current state and
    /// empties the log. The caller holds the log, so no write slips in between.
    fn replace_checkpoint(&self, wal: &mut File, collection: Option<Collection>) -> Result<()> {
        match &collection {
            Some(fresh) => write_checkpoint(&self.dir, fresh)?,
            None => write_checkpoint(&self.dir, &self.collection())?,
        }
        let mapped = read_checkpoint(&self.dir.join(CHECKPOINT), false)?;
        *self.collection_mut() = mapped;
        let path = self.dir.join(WAL);
        wal.set_len(0).map_err(io(&path))?;
        wal.sync_all().map_err(io(&path))
    }

    /// Writes the whole collection to `collection.bin`, maps it and empties the log.
    pub fn checkpoint(&self) -> Result<()> {
        let mut wal = self.writer();
        self.replace_checkpoint(&mut wal, None)
    }

    /// Rebuilds the graph without deleted and replaced points and checkpoints it. Searches
    /// go on during the rebuild; writes wait for it.
    pub fn compact(&self) -> Result<CompactReport> {
        let mut wal = self.writer();
        let nodes_before = self.collection().nodes();
        let fresh = self.collection().compacted()?;
        let nodes_after = fresh.nodes();
        self.replace_checkpoint(&mut wal, Some(fresh))?;
        Ok(CompactReport {
            nodes_before,
            nodes_after,
        })
    }

    /// Copies a consistent state of the collection to `dest`, which opens on its own.
    pub fn snapshot(&self, dest: impl AsRef<Path>) -> Result<()> {
        let mut wal = self.writer();
        self.replace_checkpoint(&mut wal, None)?;
        let dest = dest.as_ref();
        std::fs::create_dir_all(dest).map_err(io(dest))?;
        for name in [CHECKPOINT, WAL] {
            std::fs::copy(self.dir.join(name), dest.join(name)).map_err(io(dest))?;
        }
        File::open(dest)
            .and_then(|d| d.sync_all())
            .map_err(io(dest))
    }
}

/// The log is always opened for appending, so writes after truncating it start at its end.
fn open_log(path: &Path, truncate: bool) -> Result<File> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .open(path)
        .map_err(io(path))?;
    if truncate {
        file.set_len(0).map_err(io(path))?;
    }
    Ok(file)
}

/// The little-endian u32 at `at`, if the bytes are there.
fn le_u32(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
}

/// The little-endian u64 at `at`, if the bytes are there.
fn le_u64(bytes: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(bytes.get(at..at + 8)?.try_into().ok()?))
}

fn metric_code(metric: Metric) -> u32 {
    match metric {
        Metric::Cosine => 0,
        Metric::Dot => 1,
        Metric::L2 => 2,
    }
}

/// Where a section lies and its checksum.
#[derive(Debug, Clone, Copy, Default)]
struct Section {
    offset: u64,
    bytes: u64,
    crc: u32,
}

/// Writes the checkpoint beside the current one, syncs it and renames it into place.
fn write_checkpoint(dir: &Path, collection: &Collection) -> Result<()> {
    let tmp = dir.join(format!("{CHECKPOINT}.tmp"));
    let file = File::create(&tmp).map_err(io(&tmp))?;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    let graph = collection.graph();
    let (sorted_ids, sorted_nodes) = collection.sorted_index();
    let (low, step) = graph
        .quantizer
        .as_ref()
        .map_or((&[][..], &[][..]), |q| (&q.low[..], &q.step[..]));
    let runs: [[&[u8]; 2]; 13] = [
        bytes_of(&graph.vectors),
        bytes_of(&graph.layer0),
        bytes_of(&graph.levels),
        bytes_of(&graph.upper),
        bytes_of(&graph.codes),
        [bytemuck::cast_slice(low), &[]],
        [bytemuck::cast_slice(step), &[]],
        bytes_of(&collection.node_ids),
        bytes_of(&collection.live),
        bytes_of(&collection.payload_ends),
        bytes_of(&collection.payload_bytes),
        [bytemuck::cast_slice(&sorted_ids), &[]],
        [bytemuck::cast_slice(&sorted_nodes), &[]],
    ];
    let write = |out: &mut BufWriter<File>, bytes: &[u8]| out.write_all(bytes).map_err(io(&tmp));
    write(&mut out, &[0; PAGE as usize])?;
    let mut sections = [Section::default(); 13];
    let mut offset = PAGE;
    for (section, parts) in sections.iter_mut().zip(runs) {
        let mut hasher = crc32fast::Hasher::new();
        let mut bytes = 0u64;
        for part in parts {
            hasher.update(part);
            write(&mut out, part)?;
            bytes += part.len() as u64;
        }
        // The checksum covers the padding too, so no byte of the file goes unchecked.
        let padding = vec![0; (bytes.next_multiple_of(PAGE) - bytes) as usize];
        hasher.update(&padding);
        write(&mut out, &padding)?;
        *section = Section {
            offset,
            bytes,
            crc: hasher.finalize(),
        };
        offset += bytes.next_multiple_of(PAGE);
    }
    let config = collection.config();
    let params = graph.params();
    let mut header = Vec::with_capacity(HEADER_LEN);
    for field in [
        config.dim as u32,
        metric_code(config.metric),
        params.m as u32,
        params.ef_construction as u32,
        graph.entry().unwrap_or(u32::MAX),
        match config.quantization {
            Quantization::None => 0,
            Quantization::Int8 => 1,
        },
    ] {
        header.extend(field.to_le_bytes());
    }
    header.extend(params.seed.to_le_bytes());
    header.extend((graph.len() as u64).to_le_bytes());
    for section in sections {
        header.extend(section.offset.to_le_bytes());
        header.extend(section.bytes.to_le_bytes());
        header.extend(section.crc.to_le_bytes());
    }
    let mut page = MAGIC.to_vec();
    page.extend(VERSION.to_le_bytes());
    page.extend((header.len() as u32).to_le_bytes());
    page.extend(0u32.to_le_bytes()); // the checksum of the rest of the page, set below
    page.extend(&header);
    page.resize(PAGE as usize, 0);
    let crc = crc32fast::hash(&page[20..]);
    page[16..20].copy_from_slice(&crc.to_le_bytes());
    let mut file = out.into_inner().map_err(|e| io(&tmp)(e.into_error()))?;
    file.seek(SeekFrom::Start(0)).map_err(io(&tmp))?;
    file.write_all(&page).map_err(io(&tmp))?;
    file.sync_all().map_err(io(&tmp))?;
    let path = dir.join(CHECKPOINT);
    std::fs::rename(&tmp, &path).map_err(io(&path))?;
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

fn bytes_of<T: bytemuck::Pod>(column: &Column<T>) -> [&[u8]; 2] {
    column.runs().map(bytemuck::cast_slice)
}

/// CRC32 of `bytes` bytes at `offset`, read in parallel chunks through small buffers so
/// the file passes through the page cache without being mapped into the process.
fn stream_crc(file: &File, offset: u64, bytes: u64) -> std::io::Result<u32> {
    const CHUNK: u64 = 8 << 20;
    let chunks: Vec<u64> = (0..bytes.div_ceil(CHUNK)).collect();
    let hashers = chunks
        .par_iter()
        .map(|&i| {
            let start = i * CHUNK;
            let len = CHUNK.min(bytes - start) as usize;
            let mut buffer = vec![0u8; len.min(1 << 20)];
            let mut hasher = crc32fast::Hasher::new();
            let mut done = 0;
            while done < len {
                let part = buffer.len().min(len - done);
                file.read_exact_at(&mut buffer[..part], offset + start + done as u64)?;
                hasher.update(&buffer[..part]);
                done += part;
            }
            Ok(hasher)
        })
        .collect::<std::io::Result<Vec<_>>>()?;
    let mut total = crc32fast::Hasher::new();
    for hasher in &hashers {
        total.combine(hasher);
    }
    Ok(total.finalize())
}

/// Maps a checkpoint after checking its header and (with `verify`) every section checksum.
fn read_checkpoint(path: &Path, verify: bool) -> Result<Collection> {
    let file = File::open(path).map_err(io(path))?;
    let file_len = file.metadata().map_err(io(path))?.len();
    let mut page = vec![0u8; PAGE.min(file_len) as usize];
    file.read_exact_at(&mut page, 0).map_err(io(path))?;
    if page.len() < 20 || &page[..8] != MAGIC {
        return Err(corrupt(path, "not a moera collection file (bad magic)"));
    }
    let version = le_u32(&page, 8).unwrap_or_default();
    if version != VERSION {
        return Err(corrupt(path, format!("unsupported version {version}")));
    }
    let header_len = le_u32(&page, 12).unwrap_or_default() as usize;
    let header = page
        .get(20..20 + header_len)
        .filter(|h| h.len() == HEADER_LEN)
        .ok_or_else(|| corrupt(path, "the header is truncated or has the wrong size"))?;
    if page.len() < PAGE as usize || le_u32(&page, 16) != Some(crc32fast::hash(&page[20..])) {
        return Err(corrupt(path, "the header fails its checksum"));
    }
    let field = |i: usize| le_u32(header, 4 * i).unwrap_or_default();
    let metric = match field(1) {
        0 => Metric::Cosine,
        1 => Metric::Dot,
        2 => Metric::L2,
        other => return Err(corrupt(path, format!("unknown metric {other}"))),
    };
    let quantization = match field(5) {
        0 => Quantization::None,
        1 => Quantization::Int8,
        other => return Err(corrupt(path, format!("unknown quantization {other}"))),
    };
    let config = CollectionConfig {
        dim: field(0) as usize,
        metric,
        hnsw: HnswParams {
            m: field(2) as usize,
            ef_construction: field(3) as usize,
            seed: le_u64(header, 24).unwrap_or_default(),
        },
        quantization,
    };
    let entry = Some(field(4)).filter(|&e| e != u32::MAX);
    let mut sections = [Section::default(); 13];
    for (i, section) in sections.iter_mut().enumerate() {
        let at = HEADER_FIELDS + 20 * i;
        *section = Section {
            offset: le_u64(header, at).unwrap_or_default(),
            bytes: le_u64(header, at + 8).unwrap_or_default(),
            crc: le_u32(header, at + 16).unwrap_or_default(),
        };
        let name = SECTIONS[i];
        let fits = section
            .bytes
            .checked_next_multiple_of(PAGE)
            .and_then(|padded| section.offset.checked_add(padded))
            .is_some_and(|end| end <= file_len);
        if !fits {
            return Err(corrupt(path, format!("section {name} is truncated")));
        }
        if !section.offset.is_multiple_of(PAGE) {
            return Err(corrupt(path, format!("section {name} is not page-aligned")));
        }
    }
    if verify {
        let failed = sections.par_iter().enumerate().find_map_any(|(i, s)| {
            match stream_crc(&file, s.offset, s.bytes.next_multiple_of(PAGE)) {
                Ok(crc) if crc == s.crc => None,
                Ok(_) => Some(corrupt(
                    path,
                    format!("section {} fails its checksum", SECTIONS[i]),
                )),
                Err(e) => Some(io(path)(e)),
            }
        });
        if let Some(error) = failed {
            return Err(error);
        }
    }
    let columns = Columns {
        file: &file,
        path,
        sections: &sections,
    };
    let quantizer = match (columns.owned::<f32>(5)?, columns.owned::<f32>(6)?) {
        (low, step) if low.is_empty() && step.is_empty() => None,
        (low, step) if low.len() == step.len() => Some(ScalarQuantizer { low, step }),
        _ => return Err(corrupt(path, "int8 ranges are inconsistent")),
    };
    let graph = GraphColumns {
        vectors: columns.map(0)?,
        layer0: columns.map(1)?,
        levels: columns.map(2)?,
        upper: columns.map(3)?,
        codes: columns.map(4)?,
        quantizer,
        entry,
    };
    let graph = Hnsw::from_columns(config.dim, config.metric, config.hnsw, graph)
        .map_err(|reason| corrupt(path, reason))?;
    let nodes = le_u64(header, 32).unwrap_or_default();
    if nodes != graph.len() as u64 {
        return Err(corrupt(
            path,
            format!(
                "the header counts {nodes} points, the sections {}",
                graph.len()
            ),
        ));
    }
    Collection::from_columns(
        config,
        graph,
        columns.map(7)?,
        columns.map(8)?,
        columns.map(9)?,
        columns.map(10)?,
        columns.map(11)?,
        columns.map(12)?,
    )
    .map_err(|reason| corrupt(path, reason))
}

/// Maps the sections of an open checkpoint.
struct Columns<'a> {
    file: &'a File,
    path: &'a Path,
    sections: &'a [Section; 13],
}

impl Columns<'_> {
    fn map<T: bytemuck::Pod>(&self, index: usize) -> Result<Column<T>> {
        let section = self.sections[index];
        if !section.bytes.is_multiple_of(size_of::<T>() as u64) {
            let name = SECTIONS[index];
            return Err(corrupt(
                self.path,
                format!("section {name} has a partial value"),
            ));
        }
        let count = (section.bytes / size_of::<T>() as u64) as usize;
        Column::map(self.file, section.offset, count).map_err(io(self.path))
    }

    /// A small section read into memory.
    fn owned<T: bytemuck::Pod>(&self, index: usize) -> Result<Vec<T>> {
        Ok(self.map::<T>(index)?.iter().collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collection::Point;
    use serde_json::json;

    fn config() -> CollectionConfig {
        CollectionConfig::new(4, Metric::Cosine)
    }

    fn vector(i: u64) -> Vec<f32> {
        vec![1.0, (i as f32).sin(), (i as f32 * 0.3).cos(), 0.5]
    }

    fn populated(dir: &Path) -> DurableCollection {
        let c = DurableCollection::create(dir, config()).unwrap();
        for i in 0..50 {
            c.upsert(i, &vector(i), json!({"i": i})).unwrap();
        }
        c.delete(7).unwrap();
        c
    }

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("moera-store-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn log_replays_and_checkpoint_round_trips() {
        let dir = scratch("roundtrip");
        drop(populated(&dir));
        let (c, report) = DurableCollection::open(&dir).unwrap();
        assert_eq!(
            report,
            OpenReport {
                replayed: 51,
                truncated_bytes: 0
            }
        );
        assert_eq!(c.collection().count(), 49);
        assert!(c.collection().get(7).is_none());
        assert_eq!(c.collection().get(8).unwrap().payload, json!({"i": 8}));
        let c = c;
        c.checkpoint().unwrap();
        c.upsert(100, &vector(100), json!({})).unwrap();
        drop(c);
        let (c, report) = DurableCollection::open(&dir).unwrap();
        assert_eq!(report.replayed, 1);
        assert_eq!(c.collection().count(), 50);
        let hit = &c.collection().search(&vector(8), 1, 32, None).unwrap()[0];
        assert_eq!(hit.id, 8);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn torn_last_record_is_cut_and_reported() {
        let dir = scratch("torn");
        drop(populated(&dir));
        let wal = dir.join(WAL);
        let len = std::fs::metadata(&wal).unwrap().len();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&wal)
            .unwrap()
            .set_len(len - 5)
            .unwrap();
        let (c, report) = DurableCollection::open(&dir).unwrap();
        // The delete of 7 was the last record: it is gone, everything before it is there.
        assert_eq!(report.replayed, 50);
        assert_eq!(report.truncated_bytes, 12);
        assert_eq!(c.collection().count(), 50);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn corruption_is_reported_never_silent() {
        let dir = scratch("corrupt");
        let c = populated(&dir);
        c.checkpoint().unwrap();
        c.upsert(60, &vector(60), json!({})).unwrap();
        c.upsert(61, &vector(61), json!({})).unwrap();
        drop(c);
        let checkpoint = std::fs::read(dir.join(CHECKPOINT)).unwrap();
        let wal = std::fs::read(dir.join(WAL)).unwrap();
        // Flip a byte at many places of each file, and truncate each: open fails clearly.
        for at in (0..checkpoint.len()).step_by(checkpoint.len() / 40 + 1) {
            let mut bad = checkpoint.clone();
            bad[at] ^= 0x40;
            std::fs::write(dir.join(CHECKPOINT), &bad).unwrap();
            assert!(
                matches!(
                    DurableCollection::open(&dir),
                    Err(StoreError::Corrupt { .. })
                ),
                "flipped checkpoint byte {at}"
            );
        }
        for cut in [5, 20, checkpoint.len() / 2, checkpoint.len() - 1] {
            std::fs::write(dir.join(CHECKPOINT), &checkpoint[..cut]).unwrap();
            assert!(
                matches!(
                    DurableCollection::open(&dir),
                    Err(StoreError::Corrupt { .. })
                ),
                "cut at {cut}"
            );
        }
        std::fs::write(dir.join(CHECKPOINT), &checkpoint).unwrap();
        // A flipped byte in the first of two log records is corruption, not a torn tail.
        let mut bad = wal.clone();
        bad[20] ^= 0x01;
        std::fs::write(dir.join(WAL), &bad).unwrap();
        assert!(matches!(
            DurableCollection::open(&dir),
            Err(StoreError::Corrupt { .. })
        ));
        std::fs::write(dir.join(WAL), &wal).unwrap();
        assert_eq!(
            DurableCollection::open(&dir)
                .unwrap()
                .0
                .collection()
                .count(),
            51
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The section table of a checkpoint file: (name, offset, bytes).
    fn sections_of(file: &[u8]) -> Vec<(&'static str, usize, usize)> {
        let header = &file[20..20 + HEADER_LEN];
        (0..SECTIONS.len())
            .map(|i| {
                let at = HEADER_FIELDS + 20 * i;
                let offset = le_u64(header, at).unwrap() as usize;
                (
                    SECTIONS[i],
                    offset,
                    le_u64(header, at + 8).unwrap() as usize,
                )
            })
            .collect()
    }

    /// Rewrites a section's checksum and the header's, as a forger would.
    fn reseal(file: &mut [u8], section: usize) {
        let (_, offset, bytes) = sections_of(file)[section];
        let padded = (bytes as u64).next_multiple_of(PAGE) as usize;
        let crc = crc32fast::hash(&file[offset..offset + padded]);
        let at = 20 + HEADER_FIELDS + 20 * section + 16;
        file[at..at + 4].copy_from_slice(&crc.to_le_bytes());
        let crc = crc32fast::hash(&file[20..PAGE as usize]);
        file[16..20].copy_from_slice(&crc.to_le_bytes());
    }

    #[test]
    fn damage_in_every_section_is_named_on_open() {
        let dir = scratch("sections");
        let c = populated(&dir);
        c.checkpoint().unwrap();
        drop(c);
        let checkpoint = std::fs::read(dir.join(CHECKPOINT)).unwrap();
        for (name, offset, bytes) in sections_of(&checkpoint) {
            if bytes == 0 {
                continue;
            }
            let mut bad = checkpoint.clone();
            bad[offset + bytes / 2] ^= 0x08;
            std::fs::write(dir.join(CHECKPOINT), &bad).unwrap();
            match DurableCollection::open(&dir) {
                Err(StoreError::Corrupt { reason, .. }) => {
                    assert!(reason.contains(name), "{name}: {reason}")
                }
                other => panic!("{name}: {:?}", other.map(|_| ())),
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn forged_links_and_ids_are_bounds_checked_not_followed() {
        let dir = scratch("forged");
        let c = populated(&dir);
        c.checkpoint().unwrap();
        drop(c);
        let mut file = std::fs::read(dir.join(CHECKPOINT)).unwrap();
        let sections = sections_of(&file);
        // Every link of every node points past the end; the id index points nowhere.
        let (_, layer0, bytes) = sections[1];
        for word in file[layer0..layer0 + bytes].chunks_exact_mut(4) {
            word.copy_from_slice(&u32::MAX.to_le_bytes());
        }
        reseal(&mut file, 1);
        let (_, nodes, bytes) = sections[12];
        file[nodes..nodes + bytes].fill(0xff);
        reseal(&mut file, 12);
        std::fs::write(dir.join(CHECKPOINT), &file).unwrap();
        let (c, _) = DurableCollection::open(&dir).unwrap();
        let c = c.collection();
        // No panic, no point returned for the wrong id.
        assert!(c.get(8).is_none());
        assert!(c.scroll(None, 100).is_empty());
        let hits = c.search(&vector(8), 3, 16, None).unwrap();
        assert!(hits.len() <= 3);
        drop(c);
        // A forged entry point is refused outright.
        let mut file = std::fs::read(dir.join(CHECKPOINT)).unwrap();
        file[20 + 16..20 + 20].copy_from_slice(&1_000_000u32.to_le_bytes());
        let crc = crc32fast::hash(&file[20..PAGE as usize]);
        file[16..20].copy_from_slice(&crc.to_le_bytes());
        std::fs::write(dir.join(CHECKPOINT), &file).unwrap();
        assert!(matches!(
            DurableCollection::open(&dir),
            Err(StoreError::Corrupt { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn compaction_reclaims_deleted_and_replaced_points() {
        let dir = scratch("compact");
        let c = populated(&dir);
        for i in 0..20 {
            c.delete(i).unwrap();
        }
        c.upsert(30, &vector(31), json!({"moved": true})).unwrap();
        let report = c.compact().unwrap();
        assert_eq!(report.nodes_before, 51);
        assert_eq!(report.nodes_after, 30);
        let check = |c: &Collection| {
            assert_eq!(c.count(), 30);
            assert_eq!(c.nodes(), 30);
            assert!(c.get(5).is_none());
            assert_eq!(c.get(30).unwrap().payload, json!({"moved": true}));
            let ids: Vec<u64> = c.scroll(None, 100).iter().map(|p| p.id).collect();
            assert_eq!(ids, (20..50).collect::<Vec<_>>());
            assert_eq!(c.search(&vector(40), 1, 32, None).unwrap()[0].id, 40);
        };
        check(&c.collection());
        drop(c);
        let (c, report) = DurableCollection::open(&dir).unwrap();
        assert_eq!(report.replayed, 0);
        check(&c.collection());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn int8_codes_survive_a_checkpoint_and_keep_recall() {
        let dir = scratch("int8");
        let config = CollectionConfig {
            quantization: Quantization::Int8,
            ..CollectionConfig::new(24, Metric::L2)
        };
        let c = DurableCollection::create(&dir, config).unwrap();
        let points: Vec<Point> = (0..3000u64)
            .map(|id| Point {
                id,
                vector: (0..24)
                    .map(|d| ((id * 7919 + d * 104_729) % 1013) as f32 / 101.3 + d as f32)
                    .collect(),
                payload: json!(null),
            })
            .collect();
        c.upsert_batch(&points).unwrap();
        assert!(c.collection().graph().is_quantized());
        c.checkpoint().unwrap();
        drop(c);
        let (c, _) = DurableCollection::open(&dir).unwrap();
        let c = c.collection();
        assert!(c.graph().is_quantized());
        let mut found = 0;
        for p in points.iter().step_by(30) {
            let exact: Vec<u32> = c
                .graph()
                .exact_search(&p.vector, 10, None)
                .unwrap()
                .iter()
                .map(|h| h.id)
                .collect();
            let hits = c.graph().search(&p.vector, 10, 64, None).unwrap();
            found += hits.iter().filter(|h| exact.contains(&h.id)).count();
            // Rescored distances are the exact f32 ones.
            let exact_first = c.graph().exact_search(&p.vector, 1, None).unwrap()[0].distance;
            assert_eq!(hits[0].distance, exact_first);
        }
        let recall = found as f64 / (100 * 10) as f64;
        assert!(recall >= 0.95, "recall@10 with int8 codes {recall}");
        drop(c);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn searches_run_while_one_writer_upserts() {
        fn shared<T: Send + Sync>(_: &T) {}
        let dir = scratch("concurrent");
        let c = populated(&dir);
        shared(&c);
        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|scope| {
            let readers: Vec<_> = (0..3)
                .map(|r| {
                    let (c, stop) = (&c, &stop);
                    scope.spawn(move || {
                        let mut searches = 0;
                        while !stop.load(std::sync::atomic::Ordering::Relaxed) || searches == 0 {
                            let q = vector(searches % 50 + r);
                            let hits = c.collection().search(&q, 5, 32, None).unwrap();
                            assert!(!hits.is_empty() && hits.len() <= 5);
                            searches += 1;
                        }
                        searches
                    })
                })
                .collect();
            for id in 100..400 {
                c.upsert(id, &vector(id), json!({"id": id})).unwrap();
            }
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            for reader in readers {
                assert!(reader.join().unwrap() > 0);
            }
        });
        assert_eq!(c.collection().count(), 349);
        assert_eq!(
            c.collection().search(&vector(250), 1, 64, None).unwrap()[0].id,
            250
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn snapshot_opens_elsewhere() {
        let dir = scratch("snap-src");
        let dest = scratch("snap-dest");
        let c = populated(&dir);
        c.snapshot(&dest).unwrap();
        c.upsert(99, &vector(99), json!({})).unwrap();
        let (copy, _) = DurableCollection::open(&dest).unwrap();
        assert_eq!(copy.collection().count(), 49);
        assert!(copy.collection().get(99).is_none());
        std::fs::remove_dir_all(&dir).unwrap();
        std::fs::remove_dir_all(&dest).unwrap();
    }
}
