//! Durable collections: a checkpoint file plus a write-ahead log.
//!
//! Every upsert or delete is appended to `wal.log` and synced to disk before it is applied
//! and acknowledged, so a crash at any point (kill -9) loses no acknowledged write: opening
//! loads `collection.bin` and replays the log. A record torn by a crash can only be the last
//! one; it is cut off and reported. Every record and every section of the checkpoint carries
//! a CRC32, so corruption anywhere else is an error naming the file, never wrong results.
//! `checkpoint` writes a new `collection.bin` beside the old one, renames it into place and
//! then empties the log; replaying a log over a newer checkpoint is harmless, because
//! upserts and deletes are idempotent.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::collection::{Collection, CollectionConfig};
use crate::hnsw::{Hnsw, HnswParts};
use crate::{HnswParams, IndexError, Metric};

const CHECKPOINT: &str = "collection.bin";
const WAL: &str = "wal.log";
const MAGIC: &[u8; 8] = b"MOERAIDX";
const VERSION: u32 = 1;

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

/// A collection kept durable on disk.
pub struct DurableCollection {
    dir: PathBuf,
    collection: Collection,
    wal: File,
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
        let collection = Collection::new(config);
        write_checkpoint(&dir, &collection)?;
        let wal_path = dir.join(WAL);
        let wal = open_log(&wal_path, true)?;
        wal.sync_all().map_err(io(&wal_path))?;
        Ok(Self {
            dir,
            collection,
            wal,
        })
    }

    /// Opens a collection: loads the checkpoint and replays the log.
    pub fn open(dir: impl AsRef<Path>) -> Result<(Self, OpenReport)> {
        let dir = dir.as_ref().to_path_buf();
        if !dir.join(CHECKPOINT).exists() {
            return Err(StoreError::NotFound(dir));
        }
        let mut collection = read_checkpoint(&dir.join(CHECKPOINT))?;
        let wal_path = dir.join(WAL);
        let mut wal = open_log(&wal_path, false)?;
        let mut bytes = Vec::new();
        wal.read_to_end(&mut bytes).map_err(io(&wal_path))?;
        let dim = collection.config().dim;
        let mut report = OpenReport::default();
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
            let record = Record::decode(body.expect("valid record has a body"), dim)
                .ok_or_else(|| corrupt(&wal_path, format!("record at byte {at} is malformed")))?;
            apply(&mut collection, record)?;
            report.replayed += 1;
            at = end;
        }
        Ok((
            Self {
                dir,
                collection,
                wal,
            },
            report,
        ))
    }

    pub fn collection(&self) -> &Collection {
        &self.collection
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn log(&mut self, records: &[Record]) -> Result<()> {
        let path = self.dir.join(WAL);
        let bytes: Vec<u8> = records.iter().flat_map(Record::encode).collect();
        self.wal.write_all(&bytes).map_err(io(&path))?;
        self.wal.sync_data().map_err(io(&path))
    }

    /// Inserts or replaces a point; durable when this returns.
    pub fn upsert(&mut self, id: u64, vector: &[f32], payload: Value) -> Result<()> {
        self.upsert_batch(vec![(id, vector.to_vec(), payload)])
    }

    /// Several upserts with a single disk sync.
    pub fn upsert_batch(&mut self, points: Vec<(u64, Vec<f32>, Value)>) -> Result<()> {
        let dim = self.collection.config().dim;
        for (_, vector, _) in &points {
            if vector.len() != dim {
                return Err(IndexError::Dimension {
                    expected: dim,
                    found: vector.len(),
                }
                .into());
            }
            if !vector.iter().all(|v| v.is_finite()) {
                return Err(IndexError::NonFinite.into());
            }
        }
        let records: Vec<Record> = points
            .into_iter()
            .map(|(id, vector, payload)| Record::Upsert {
                id,
                vector,
                payload,
            })
            .collect();
        self.log(&records)?;
        for record in records {
            apply(&mut self.collection, record)?;
        }
        Ok(())
    }

    /// Deletes a point; durable when this returns. Returns whether it existed.
    pub fn delete(&mut self, id: u64) -> Result<bool> {
        let existed = self.collection.get(id).is_some();
        self.log(&[Record::Delete { id }])?;
        self.collection.delete(id);
        Ok(existed)
    }

    /// Writes the whole collection to `collection.bin` and empties the log.
    pub fn checkpoint(&mut self) -> Result<()> {
        write_checkpoint(&self.dir, &self.collection)?;
        let path = self.dir.join(WAL);
        self.wal.set_len(0).map_err(io(&path))?;
        self.wal.sync_all().map_err(io(&path))
    }

    /// Copies a consistent state of the collection to `dest`, which opens on its own.
    pub fn snapshot(&mut self, dest: impl AsRef<Path>) -> Result<()> {
        self.checkpoint()?;
        let dest = dest.as_ref();
        std::fs::create_dir_all(dest).map_err(io(dest))?;
        for name in [CHECKPOINT, WAL] {
            std::fs::copy(self.dir.join(name), dest.join(name)).map_err(io(dest))?;
        }
        Ok(())
    }
}

/// The log is always opened for appending, so writes after truncating it start at its end.
fn open_log(path: &Path, truncate: bool) -> Result<File> {
    let file = OpenOptions::new()
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

fn apply(collection: &mut Collection, record: Record) -> Result<()> {
    match record {
        Record::Upsert {
            id,
            vector,
            payload,
        } => collection.upsert(id, &vector, payload)?,
        Record::Delete { id } => {
            collection.delete(id);
        }
    }
    Ok(())
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

fn section(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend((bytes.len() as u64).to_le_bytes());
    out.extend(crc32fast::hash(bytes).to_le_bytes());
    out.extend(bytes);
}

fn u32s(values: &[u32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn write_checkpoint(dir: &Path, collection: &Collection) -> Result<()> {
    let config = collection.config();
    let graph = collection.graph();
    let parts = graph.to_parts();
    let params = graph.params();
    let mut out = MAGIC.to_vec();
    out.extend(VERSION.to_le_bytes());
    let header = u32s(&[
        config.dim as u32,
        metric_code(config.metric),
        params.m as u32,
        params.ef_construction as u32,
        parts.entry.unwrap_or(u32::MAX),
    ]);
    section(
        &mut out,
        &[header, params.seed.to_le_bytes().to_vec()].concat(),
    );
    section(
        &mut out,
        &parts
            .vectors
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect::<Vec<_>>(),
    );
    section(&mut out, &parts.levels);
    section(&mut out, &u32s(&parts.layer0));
    section(&mut out, &u32s(&parts.upper));
    let mut slots = Vec::new();
    for slot in collection.slots() {
        match slot {
            Some((id, payload)) => {
                slots.push(1);
                slots.extend(id.to_le_bytes());
                let text = payload.to_string();
                slots.extend((text.len() as u32).to_le_bytes());
                slots.extend(text.as_bytes());
            }
            None => slots.push(0),
        }
    }
    section(&mut out, &slots);

    let tmp = dir.join(format!("{CHECKPOINT}.tmp"));
    let mut file = File::create(&tmp).map_err(io(&tmp))?;
    file.write_all(&out).map_err(io(&tmp))?;
    file.sync_all().map_err(io(&tmp))?;
    let path = dir.join(CHECKPOINT);
    std::fs::rename(&tmp, &path).map_err(io(&path))?;
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

fn read_checkpoint(path: &Path) -> Result<Collection> {
    let bytes = std::fs::read(path).map_err(io(path))?;
    if bytes.len() < 12 || &bytes[..8] != MAGIC {
        return Err(corrupt(path, "not a moera collection file (bad magic)"));
    }
    let version = le_u32(&bytes, 8).unwrap_or_default();
    if version != VERSION {
        return Err(corrupt(path, format!("unsupported version {version}")));
    }
    let mut at = 12;
    let mut next = |name: &str| -> Result<&[u8]> {
        let (Some(len), Some(crc)) = (le_u64(&bytes, at), le_u32(&bytes, at + 8)) else {
            return Err(corrupt(path, format!("truncated before section {name}")));
        };
        let len = len as usize;
        let body = at
            .checked_add(12 + len)
            .and_then(|end| bytes.get(at + 12..end))
            .ok_or_else(|| corrupt(path, format!("section {name} is truncated")))?;
        if crc32fast::hash(body) != crc {
            return Err(corrupt(path, format!("section {name} fails its checksum")));
        }
        at += 12 + len;
        Ok(body)
    };
    let header = next("header")?;
    if header.len() != 28 {
        return Err(corrupt(path, "header has the wrong size"));
    }
    let field = |i: usize| le_u32(header, 4 * i).unwrap_or_default();
    let metric = match field(1) {
        0 => Metric::Cosine,
        1 => Metric::Dot,
        2 => Metric::L2,
        other => return Err(corrupt(path, format!("unknown metric {other}"))),
    };
    let config = CollectionConfig {
        dim: field(0) as usize,
        metric,
        hnsw: HnswParams {
            m: field(2) as usize,
            ef_construction: field(3) as usize,
            seed: le_u64(header, 20).unwrap_or_default(),
        },
    };
    let entry = Some(field(4)).filter(|&e| e != u32::MAX);
    let to_u32 = |b: &[u8]| -> Vec<u32> {
        b.chunks_exact(4)
            .map(|c| u32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    };
    let vectors: Vec<f32> = next("vectors")?
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let levels = next("levels")?.to_vec();
    let layer0 = to_u32(next("layer0")?);
    let upper = to_u32(next("upper")?);
    let slot_bytes = next("points")?;
    let mut slots = Vec::with_capacity(levels.len());
    let mut i = 0;
    while i < slot_bytes.len() {
        let bad = || corrupt(path, "point records are malformed");
        match slot_bytes[i] {
            0 => {
                slots.push(None);
                i += 1;
            }
            1 => {
                let id = le_u64(slot_bytes, i + 1).ok_or_else(bad)?;
                let len = le_u32(slot_bytes, i + 9).ok_or_else(bad)? as usize;
                let text = slot_bytes.get(i + 13..i + 13 + len).ok_or_else(bad)?;
                let payload = serde_json::from_slice(text).map_err(|_| bad())?;
                slots.push(Some((id, payload)));
                i += 13 + len;
            }
            _ => return Err(bad()),
        }
    }
    let parts = HnswParts {
        vectors,
        levels,
        layer0,
        upper,
        entry,
    };
    let graph = Hnsw::from_parts(config.dim, config.metric, config.hnsw, parts)
        .map_err(|reason| corrupt(path, reason))?;
    Collection::from_parts(config, graph, slots).map_err(|reason| corrupt(path, reason))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn config() -> CollectionConfig {
        CollectionConfig {
            dim: 4,
            metric: Metric::Cosine,
            hnsw: HnswParams::default(),
        }
    }

    fn vector(i: u64) -> Vec<f32> {
        vec![1.0, (i as f32).sin(), (i as f32 * 0.3).cos(), 0.5]
    }

    fn populated(dir: &Path) -> DurableCollection {
        let mut c = DurableCollection::create(dir, config()).unwrap();
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
        let mut c = c;
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
        OpenOptions::new()
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
        let mut c = populated(&dir);
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

    #[test]
    fn snapshot_opens_elsewhere() {
        let dir = scratch("snap-src");
        let dest = scratch("snap-dest");
        let mut c = populated(&dir);
        c.snapshot(&dest).unwrap();
        c.upsert(99, &vector(99), json!({})).unwrap();
        let (copy, _) = DurableCollection::open(&dest).unwrap();
        assert_eq!(copy.collection().count(), 49);
        assert!(copy.collection().get(99).is_none());
        std::fs::remove_dir_all(&dir).unwrap();
        std::fs::remove_dir_all(&dest).unwrap();
    }
}
