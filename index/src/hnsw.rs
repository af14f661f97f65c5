//! Hierarchical navigable small-world graph (Malkov & Yashunin), laid out flat like hnswlib:
//! layer 0 is one array of fixed-size neighbour blocks `[count, id × 2M]`, upper layers a
//! block of `[count, id × M]` per level for the few nodes that reach them, and the vectors
//! one contiguous array. This is the layout a memory-mapped file can hold as is.

use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;
use std::sync::Mutex;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;

use crate::column::Column;
use crate::distance::prefetch;
use crate::quant::{QueryCodes, ScalarQuantizer};
use crate::{IndexError, Metric};

/// Graph parameters, as in hnswlib.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HnswParams {
    /// Links per node on the upper layers (twice as many on layer 0).
    pub m: usize,
    /// Candidate list size while inserting.
    pub ef_construction: usize,
    /// Seed of the level draws, so a build is reproducible.
    pub seed: u64,
}

impl Default for HnswParams {
    fn default() -> Self {
        Self {
            m: 16,
            ef_construction: 200,
            seed: 42,
        }
    }
}

/// One search result.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Hit {
    pub id: u32,
    pub distance: f32,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Scored {
    distance: f32,
    id: u32,
}

impl Eq for Scored {}

impl Ord for Scored {
    fn cmp(&self, other: &Self) -> Ordering {
        self.distance
            .total_cmp(&other.distance)
            .then(self.id.cmp(&other.id))
    }
}

impl PartialOrd for Scored {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// Marks of visited nodes, cleared in O(1) by bumping an epoch.
#[derive(Default)]
struct Visited {
    marks: Vec<u32>,
    epoch: u32,
}

impl Visited {
    fn reset(&mut self, nodes: usize) {
        self.marks.resize(nodes, 0);
        self.epoch = self.epoch.wrapping_add(1);
        if self.epoch == 0 {
            self.marks.fill(0);
            self.epoch = 1;
        }
    }

    /// True the first time `id` is seen since the last reset.
    fn insert(&mut self, id: u32) -> bool {
        let mark = &mut self.marks[id as usize];
        let first = *mark != self.epoch;
        *mark = self.epoch;
        first
    }
}

/// A filter on point ids, checked during traversal: rejected points still guide the walk
/// but never enter the results.
pub type NodeFilter<'a> = &'a (dyn Fn(u32) -> bool + Sync);

/// How a walk measures the distance from its query to a node: f32 vectors or int8 codes.
trait Space {
    fn distance(&self, id: u32) -> f32;
    /// Starts loading what `distance` will read, while earlier distances are computed.
    fn prefetch(&self, id: u32);
}

struct Exact<'a> {
    graph: &'a Hnsw,
    query: &'a [f32],
    kernel: fn(&[f32], &[f32]) -> f32,
}

impl Space for Exact<'_> {
    #[inline]
    fn distance(&self, id: u32) -> f32 {
        (self.kernel)(self.query, self.graph.vector(id))
    }

    #[inline]
    fn prefetch(&self, id: u32) {
        prefetch(self.graph.vector(id));
    }
}

struct Coded<'a> {
    graph: &'a Hnsw,
    query: QueryCodes,
}

impl Space for Coded<'_> {
    #[inline]
    fn distance(&self, id: u32) -> f32 {
        let dim = self.graph.dim;
        self.query
            .distance(self.graph.codes.slice(id as usize * dim, dim))
    }

    #[inline]
    fn prefetch(&self, id: u32) {
        let dim = self.graph.dim;
        prefetch(self.graph.codes.slice(id as usize * dim, dim));
    }
}

/// An HNSW index over vectors of one dimension and metric. Ids are insertion order.
///
/// Its arrays may be memory-mapped from a checkpoint (see [`crate::store`]); links read from
/// a file are bounds-checked where they are followed, so a damaged file cannot cause an
/// out-of-bounds access.
pub struct Hnsw {
    dim: usize,
    metric: Metric,
    params: HnswParams,
    pub(crate) vectors: Column<f32>,
    /// Per node: `[count, id × 2M]`.
    pub(crate) layer0: Column<u32>,
    pub(crate) levels: Column<u8>,
    /// Per node with level L > 0: L blocks `[count, id × M]`, in node order.
    pub(crate) upper: Column<u32>,
    /// Where each node's upper blocks start in `upper`.
    upper_start: Vec<usize>,
    pub(crate) quantizer: Option<ScalarQuantizer>,
    /// int8 codes of every vector once `quantizer` is set.
    pub(crate) codes: Column<i8>,
    entry: Option<u32>,
    max_level: usize,
    rng: Mutex<StdRng>,
    visited_pool: Mutex<Vec<Visited>>,
}

const MAX_LEVEL: usize = 16;

/// Where a new vector will be linked, found by searching the graph (the expensive part of an
/// insert, done with shared access so that searches and other plans run beside it).
pub(crate) struct Plan {
    vector: Vec<f32>,
    level: usize,
    /// Chosen neighbours on each level from 0 up.
    links: Vec<Vec<Scored>>,
}

impl Hnsw {
    pub fn new(dim: usize, metric: Metric, params: HnswParams) -> Self {
        let params = HnswParams {
            m: params.m.max(2),
            ef_construction: params.ef_construction.max(1),
            ..params
        };
        Self {
            dim,
            metric,
            params,
            vectors: Column::default(),
            layer0: Column::default(),
            levels: Column::default(),
            upper: Column::default(),
            upper_start: Vec::new(),
            quantizer: None,
            codes: Column::default(),
            entry: None,
            max_level: 0,
            rng: Mutex::new(StdRng::seed_from_u64(params.seed)),
            visited_pool: Mutex::new(Vec::new()),
        }
    }

    pub fn len(&self) -> usize {
        self.levels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    pub fn metric(&self) -> Metric {
        self.metric
    }

    pub fn params(&self) -> HnswParams {
        self.params
    }

    pub(crate) fn entry(&self) -> Option<u32> {
        self.entry
    }

    /// The stored (for cosine: normalized) vector of `id`.
    pub fn vector(&self, id: u32) -> &[f32] {
        self.vectors.slice(id as usize * self.dim, self.dim)
    }

    fn block0(&self) -> usize {
        1 + 2 * self.params.m
    }

    fn block_upper(&self) -> usize {
        1 + self.params.m
    }

    fn max_links(&self, level: usize) -> usize {
        if level == 0 {
            2 * self.params.m
        } else {
            self.params.m
        }
    }

    fn block_start(&self, id: u32, level: usize) -> usize {
        if level == 0 {
            id as usize * self.block0()
        } else {
            self.upper_start[id as usize] + (level - 1) * self.block_upper()
        }
    }

    fn neighbors(&self, id: u32, level: usize) -> &[u32] {
        let start = self.block_start(id, level);
        let size = if level == 0 {
            self.block0()
        } else {
            self.block_upper()
        };
        let block = if level == 0 {
            self.layer0.slice(start, size)
        } else {
            self.upper.slice(start, size)
        };
        let count = (block[0] as usize).min(size - 1);
        &block[1..1 + count]
    }

    fn set_neighbors(&mut self, id: u32, level: usize, ids: impl ExactSizeIterator<Item = u32>) {
        let start = self.block_start(id, level);
        let block = if level == 0 {
            let size = self.block0();
            self.layer0.slice_mut(start, size)
        } else {
            let size = self.block_upper();
            self.upper.slice_mut(start, size)
        };
        block[0] = ids.len() as u32;
        for (slot, n) in block[1..].iter_mut().zip(ids) {
            *slot = n;
        }
    }

    fn distance_to(&self, query: &[f32], id: u32) -> f32 {
        self.metric.distance(query, self.vector(id))
    }

    fn exact<'a>(&'a self, query: &'a [f32]) -> Exact<'a> {
        Exact {
            graph: self,
            query,
            kernel: self.metric.kernel(),
        }
    }

    /// A checked copy of `vector` in stored form (normalized for cosine).
    fn prepared(&self, vector: &[f32]) -> Result<Vec<f32>, IndexError> {
        self.check(vector)?;
        let mut stored = vector.to_vec();
        self.metric.prepare(&mut stored);
        Ok(stored)
    }

    fn check(&self, vector: &[f32]) -> Result<(), IndexError> {
        if vector.len() != self.dim {
            return Err(IndexError::Dimension {
                expected: self.dim,
                found: vector.len(),
            });
        }
        if !vector.iter().all(|v| v.is_finite()) {
            return Err(IndexError::NonFinite);
        }
        Ok(())
    }

    fn random_level(&self) -> usize {
        let multiplier = 1.0 / (self.params.m as f64).ln();
        let draw: f64 = self
            .rng
            .lock()
            .map(|mut rng| rng.random())
            .unwrap_or_default();
        let uniform = 1.0 - draw; // (0, 1]
        ((-uniform.ln() * multiplier) as usize).min(MAX_LEVEL)
    }

    /// Adds a vector and returns its id.
    pub fn insert(&mut self, vector: &[f32]) -> Result<u32, IndexError> {
        let plan = self.plan(vector, self.random_level())?;
        Ok(self.apply_batch(vec![plan])?[0])
    }

    /// Adds many vectors, searching for their links in parallel; returns the first new id.
    ///
    /// Vectors are added in chunks that are small next to the graph (1/40 of it): a chunk's
    /// vectors are linked to the graph as it was before the chunk, which costs no measurable
    /// recall at that ratio and lets every core search.
    pub fn insert_batch(&mut self, vectors: &[&[f32]]) -> Result<u32, IndexError> {
        let first = self.len() as u32;
        let mut rest = vectors;
        while !rest.is_empty() {
            let (chunk, tail) = rest.split_at(self.chunk_size().min(rest.len()));
            let plans = self.plan_batch(chunk)?;
            self.apply_batch(plans)?;
            rest = tail;
        }
        Ok(first)
    }

    /// How many vectors [`insert_batch`](Self::insert_batch) links against the same graph.
    pub(crate) fn chunk_size(&self) -> usize {
        (self.len() / 40).clamp(1, 1024)
    }

    /// Plans for several vectors, found in parallel; levels are drawn in order, so a build
    /// is reproducible.
    pub(crate) fn plan_batch(&self, vectors: &[&[f32]]) -> Result<Vec<Plan>, IndexError> {
        let levels: Vec<usize> = vectors.iter().map(|_| self.random_level()).collect();
        vectors
            .par_iter()
            .zip(levels)
            .map(|(v, level)| self.plan(v, level))
            .collect()
    }

    /// Searches the graph for the neighbours of a new vector on each of its levels.
    pub(crate) fn plan(&self, vector: &[f32], level: usize) -> Result<Plan, IndexError> {
        let stored = self.prepared(vector)?;
        let mut links = vec![Vec::new(); level + 1];
        if let Some(entry) = self.entry {
            let exact = self.exact(&stored);
            let mut nearest = Scored {
                distance: exact.distance(entry),
                id: entry,
            };
            for l in (level + 1..=self.max_level).rev() {
                nearest = self.greedy(&exact, nearest, l);
            }
            for l in (0..=level.min(self.max_level)).rev() {
                let found =
                    self.search_layer(&exact, nearest, self.params.ef_construction, l, None);
                links[l] = self.select_neighbors(&found, self.params.m);
                nearest = found[0];
            }
        }
        Ok(Plan {
            vector: stored,
            level,
            links,
        })
    }

    /// Adds planned vectors: each one's own links, then links back to them from their
    /// neighbours. Every neighbour gaining links is re-pruned once, in parallel.
    pub(crate) fn apply_batch(&mut self, plans: Vec<Plan>) -> Result<Vec<u32>, IndexError> {
        let mut ids = Vec::with_capacity(plans.len());
        let mut back_links: Vec<(usize, u32, Scored)> = Vec::new();
        for plan in plans {
            let id = u32::try_from(self.len())
                .ok()
                .filter(|&id| id < u32::MAX)
                .ok_or(IndexError::Full(u32::MAX as usize))?;
            self.vectors.extend_from_slice(&plan.vector);
            if let Some(quantizer) = &self.quantizer {
                let mut codes = Vec::with_capacity(self.dim);
                quantizer.encode(&plan.vector, &mut codes);
                self.codes.extend_from_slice(&codes);
            }
            self.levels.push(plan.level as u8);
            self.upper_start.push(self.upper.len());
            self.upper
                .extend_from_slice(&vec![0; plan.level * self.block_upper()]);
            self.layer0.extend_from_slice(&vec![0; self.block0()]);
            for (level, links) in plan.links.iter().enumerate() {
                self.set_neighbors(id, level, links.iter().map(|s| s.id));
                back_links.extend(links.iter().map(|link| {
                    let back = Scored {
                        distance: link.distance,
                        id,
                    };
                    (level, link.id, back)
                }));
            }
            if self.entry.is_none() || plan.level > self.max_level {
                self.entry = Some(id);
                self.max_level = plan.level;
            }
            ids.push(id);
        }
        back_links.sort_unstable_by_key(|&(level, node, _)| (level, node));
        let groups: Vec<&[(usize, u32, Scored)]> = back_links
            .chunk_by(|a, b| (a.0, a.1) == (b.0, b.1))
            .collect();
        let updates: Vec<(usize, u32, Vec<u32>)> = groups
            .par_iter()
            .map(|group| {
                let (level, node) = (group[0].0, group[0].1);
                let links = self.merged_links(node, level, group.iter().map(|g| g.2));
                (level, node, links)
            })
            .collect();
        for (level, node, links) in updates {
            self.set_neighbors(node, level, links.into_iter());
        }
        Ok(ids)
    }

    /// The links of `node` with `new` added, pruned with the heuristic when too many.
    fn merged_links(&self, node: u32, level: usize, new: impl Iterator<Item = Scored>) -> Vec<u32> {
        let max = self.max_links(level);
        let len = self.len();
        let mut ids: Vec<u32> = self
            .neighbors(node, level)
            .iter()
            .copied()
            .filter(|&n| (n as usize) < len)
            .collect();
        let new: Vec<Scored> = new.collect();
        if ids.len() + new.len() <= max {
            ids.extend(new.iter().map(|s| s.id));
            return ids;
        }
        let base = self.vector(node);
        let mut candidates: Vec<Scored> = ids
            .iter()
            .map(|&id| Scored {
                distance: self.metric.distance(base, self.vector(id)),
                id,
            })
            .chain(new)
            .collect();
        candidates.sort_unstable();
        self.select_neighbors(&candidates, max)
            .into_iter()
            .map(|s| s.id)
            .collect()
    }

    /// hnswlib's heuristic: walking candidates from the closest, keep one only if it is
    /// closer to the base than to every neighbour kept so far (spreads links in all directions).
    fn select_neighbors(&self, sorted: &[Scored], max: usize) -> Vec<Scored> {
        if sorted.len() <= max {
            return sorted.to_vec();
        }
        let mut kept: Vec<Scored> = Vec::with_capacity(max);
        for candidate in sorted {
            if kept.len() >= max {
                break;
            }
            let vector = self.vector(candidate.id);
            // Ties count as diverse, as in hnswlib, except among exact copies of the base:
            // one of those is enough, or clusters of copies link only to each other.
            let diverse = kept.iter().all(|k| {
                let to_kept = self.metric.distance(vector, self.vector(k.id));
                to_kept > candidate.distance
                    || (to_kept == candidate.distance && candidate.distance > self.metric.floor())
            });
            if diverse {
                kept.push(*candidate);
            }
        }
        kept
    }

    fn greedy(&self, space: &impl Space, mut nearest: Scored, level: usize) -> Scored {
        let len = self.len();
        loop {
            let mut moved = false;
            for &n in self.neighbors(nearest.id, level) {
                if n as usize >= len {
                    continue;
                }
                let d = space.distance(n);
                if d < nearest.distance {
                    nearest = Scored { distance: d, id: n };
                    moved = true;
                }
            }
            if !moved {
                return nearest;
            }
        }
    }

    /// Best-first search of one layer from `entry`; returns up to `ef` accepted points, closest first.
    fn search_layer(
        &self,
        space: &impl Space,
        entry: Scored,
        ef: usize,
        level: usize,
        filter: Option<NodeFilter<'_>>,
    ) -> Vec<Scored> {
        let accept = |id: u32| filter.is_none_or(|f| f(id));
        let len = self.len();
        let mut visited = self
            .visited_pool
            .lock()
            .map(|mut pool| pool.pop())
            .ok()
            .flatten()
            .unwrap_or_default();
        visited.reset(len);
        visited.insert(entry.id);
        let mut candidates = BinaryHeap::from([Reverse(entry)]);
        let mut results = BinaryHeap::new();
        let mut fresh = Vec::with_capacity(self.block0());
        if accept(entry.id) {
            results.push(entry);
        }
        while let Some(Reverse(candidate)) = candidates.pop() {
            let worst = results
                .peek()
                .map_or(f32::INFINITY, |w: &Scored| w.distance);
            if results.len() >= ef && candidate.distance > worst {
                break;
            }
            // Unvisited neighbours first, their data prefetched, then their distances.
            fresh.clear();
            for &n in self.neighbors(candidate.id, level) {
                if (n as usize) < len && visited.insert(n) {
                    space.prefetch(n);
                    fresh.push(n);
                }
            }
            for &n in &fresh {
                let d = space.distance(n);
                let worst = results.peek().map_or(f32::INFINITY, |w| w.distance);
                if results.len() < ef || d < worst {
                    let scored = Scored { distance: d, id: n };
                    candidates.push(Reverse(scored));
                    if accept(n) {
                        results.push(scored);
                        if results.len() > ef {
                            results.pop();
                        }
                    }
                }
            }
        }
        if let Ok(mut pool) = self.visited_pool.lock() {
            pool.push(visited);
        }
        results.into_sorted_vec()
    }

    /// Walks from the entry point down to layer 0 and returns the `ef` best accepted points.
    fn walk(&self, space: &impl Space, ef: usize, filter: Option<NodeFilter<'_>>) -> Vec<Scored> {
        let Some(entry) = self.entry else {
            return Vec::new();
        };
        let mut nearest = Scored {
            distance: space.distance(entry),
            id: entry,
        };
        for level in (1..=self.max_level).rev() {
            nearest = self.greedy(space, nearest, level);
        }
        self.search_layer(space, nearest, ef, 0, filter)
    }

    /// The `k` nearest points to `query` (closest first), exploring `ef` candidates
    /// (at least `k`); `filter` restricts the results. With int8 codes the walk compares
    /// codes and the `ef` candidates it finds are rescored with the f32 vectors.
    pub fn search(
        &self,
        query: &[f32],
        k: usize,
        ef: usize,
        filter: Option<NodeFilter<'_>>,
    ) -> Result<Vec<Hit>, IndexError> {
        let query = self.prepared(query)?;
        let ef = ef.max(k);
        let found = match &self.quantizer {
            Some(quantizer) if self.codes.len() == self.len() * self.dim => {
                let coded = Coded {
                    graph: self,
                    query: quantizer.prepare_query(self.metric, &query),
                };
                let mut rescored: Vec<Scored> = self
                    .walk(&coded, ef, filter)
                    .into_iter()
                    .map(|s| Scored {
                        distance: self.distance_to(&query, s.id),
                        id: s.id,
                    })
                    .collect();
                rescored.sort_unstable();
                rescored
            }
            _ => self.walk(&self.exact(&query), ef, filter),
        };
        Ok(found
            .into_iter()
            .take(k)
            .map(|s| Hit {
                id: s.id,
                distance: s.distance,
            })
            .collect())
    }

    /// [`search`](Self::search) for many queries in parallel.
    pub fn search_batch(
        &self,
        queries: &[&[f32]],
        k: usize,
        ef: usize,
        filter: Option<NodeFilter<'_>>,
    ) -> Result<Vec<Vec<Hit>>, IndexError> {
        queries
            .par_iter()
            .map(|q| self.search(q, k, ef, filter))
            .collect()
    }

    /// Exact `k` nearest by scanning every point: the reference for recall, and the right
    /// plan when a filter admits few points.
    pub fn exact_search(
        &self,
        query: &[f32],
        k: usize,
        filter: Option<NodeFilter<'_>>,
    ) -> Result<Vec<Hit>, IndexError> {
        let query = self.prepared(query)?;
        let mut best = BinaryHeap::new();
        for id in 0..self.len() as u32 {
            if filter.is_some_and(|f| !f(id)) {
                continue;
            }
            best.push(Scored {
                distance: self.distance_to(&query, id),
                id,
            });
            if best.len() > k {
                best.pop();
            }
        }
        Ok(best
            .into_sorted_vec()
            .into_iter()
            .map(|s| Hit {
                id: s.id,
                distance: s.distance,
            })
            .collect())
    }

    /// Fits int8 codes to the stored vectors; from now on searches walk the codes and
    /// rescore in f32, and new vectors are coded with the same ranges.
    pub fn quantize(&mut self) {
        let quantizer = ScalarQuantizer::fit(self.vectors.iter(), self.dim);
        let mut codes = Vec::with_capacity(self.vectors.len());
        for id in 0..self.len() as u32 {
            quantizer.encode(self.vector(id), &mut codes);
        }
        self.codes = Column::from_vec(codes);
        self.quantizer = Some(quantizer);
    }

    pub fn is_quantized(&self) -> bool {
        self.quantizer.is_some()
    }
}

/// The arrays of a graph as a checkpoint holds them.
pub(crate) struct GraphColumns {
    pub vectors: Column<f32>,
    pub layer0: Column<u32>,
    pub levels: Column<u8>,
    pub upper: Column<u32>,
    pub codes: Column<i8>,
    pub quantizer: Option<ScalarQuantizer>,
    pub entry: Option<u32>,
}

impl Hnsw {
    /// A graph over saved (usually memory-mapped) arrays. Sizes, levels and the entry point
    /// are checked here; links are checked where they are followed, so opening does not
    /// read the whole graph.
    pub(crate) fn from_columns(
        dim: usize,
        metric: Metric,
        params: HnswParams,
        columns: GraphColumns,
    ) -> Result<Self, String> {
        let mut graph = Self::new(dim, metric, params);
        if graph.params != params {
            return Err(format!("invalid graph parameters {params:?}"));
        }
        let n = columns.levels.len();
        if Some(columns.vectors.len()) != n.checked_mul(dim) {
            return Err(format!(
                "{} vector values for {n} points of dimension {dim}",
                columns.vectors.len()
            ));
        }
        if columns.layer0.len() != n * graph.block0() {
            return Err("layer-0 links do not match the point count".into());
        }
        let max_level = match columns.entry {
            Some(entry) if (entry as usize) < n => columns.levels.get(entry as usize) as usize,
            None if n == 0 => 0,
            _ => {
                return Err(format!(
                    "entry point {:?} is invalid for {n} points",
                    columns.entry
                ));
            }
        };
        if max_level > MAX_LEVEL {
            return Err("the entry point's level is out of range".into());
        }
        let mut upper_start = Vec::with_capacity(n);
        let mut upper_len = 0usize;
        for level in columns.levels.iter() {
            if level as usize > max_level {
                return Err("a node lies above the entry point's level".into());
            }
            upper_start.push(upper_len);
            upper_len += level as usize * graph.block_upper();
        }
        if columns.upper.len() != upper_len {
            return Err("upper-layer links do not match the node levels".into());
        }
        match &columns.quantizer {
            Some(q) if q.dim() != dim || columns.codes.len() != n * dim => {
                return Err("int8 codes do not match the vectors".into());
            }
            None if columns.codes.len() != 0 => {
                return Err("int8 codes without their ranges".into());
            }
            _ => {}
        }
        graph.vectors = columns.vectors;
        graph.layer0 = columns.layer0;
        graph.levels = columns.levels;
        graph.upper = columns.upper;
        graph.upper_start = upper_start;
        graph.codes = columns.codes;
        graph.quantizer = columns.quantizer;
        graph.entry = columns.entry;
        graph.max_level = max_level;
        // Fresh level draws after a reload; any seed keeps the graph valid.
        graph.rng = Mutex::new(StdRng::seed_from_u64(params.seed.wrapping_add(n as u64)));
        Ok(graph)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random_points(n: usize, dim: usize, seed: u64) -> Vec<Vec<f32>> {
        let mut rng = StdRng::seed_from_u64(seed);
        (0..n)
            .map(|_| (0..dim).map(|_| rng.random::<f32>() * 2.0 - 1.0).collect())
            .collect()
    }

    fn build(points: &[Vec<f32>], metric: Metric) -> Hnsw {
        let mut index = Hnsw::new(points[0].len(), metric, HnswParams::default());
        for p in points {
            index.insert(p).unwrap();
        }
        index
    }

    fn recall(index: &Hnsw, queries: &[Vec<f32>], k: usize, ef: usize) -> f64 {
        let mut hits = 0;
        for q in queries {
            let truth: Vec<u32> = index
                .exact_search(q, k, None)
                .unwrap()
                .iter()
                .map(|h| h.id)
                .collect();
            let found = index.search(q, k, ef, None).unwrap();
            hits += found.iter().filter(|h| truth.contains(&h.id)).count();
        }
        hits as f64 / (queries.len() * k) as f64
    }

    #[test]
    fn recall_against_brute_force_for_every_metric() {
        let points = random_points(3000, 24, 1);
        let queries = random_points(100, 24, 2);
        for metric in [Metric::Cosine, Metric::Dot, Metric::L2] {
            let index = build(&points, metric);
            let r = recall(&index, &queries, 10, 64);
            assert!(r >= 0.95, "{metric:?}: recall@10 {r}");
        }
    }

    #[test]
    fn filtered_search_equals_brute_force_with_the_same_filter() {
        let points = random_points(1500, 16, 3);
        let index = build(&points, Metric::L2);
        for q in random_points(20, 16, 4) {
            for modulus in [2u32, 7, 50] {
                let filter = move |id: u32| id % modulus == 1;
                let truth = index.exact_search(&q, 10, Some(&filter)).unwrap();
                // ef as large as the collection makes the graph walk exhaustive.
                let found = index.search(&q, 10, index.len(), Some(&filter)).unwrap();
                assert_eq!(found, truth, "modulus {modulus}");
                assert!(found.iter().all(|h| h.id % modulus == 1));
            }
        }
    }

    #[test]
    fn exact_search_matches_a_naive_scan() {
        let points = random_points(200, 8, 5);
        let index = build(&points, Metric::Dot);
        let q = &random_points(1, 8, 6)[0];
        let mut naive: Vec<(f32, u32)> = points
            .iter()
            .enumerate()
            .map(|(i, p)| (-p.iter().zip(q).map(|(a, b)| a * b).sum::<f32>(), i as u32))
            .collect();
        naive.sort_by(|a, b| a.0.total_cmp(&b.0));
        let exact: Vec<u32> = index
            .exact_search(q, 5, None)
            .unwrap()
            .iter()
            .map(|h| h.id)
            .collect();
        assert_eq!(exact, naive[..5].iter().map(|p| p.1).collect::<Vec<_>>());
    }

    #[test]
    fn bad_vectors_are_rejected() {
        let mut index = Hnsw::new(3, Metric::L2, HnswParams::default());
        assert!(matches!(
            index.insert(&[1.0, 2.0]),
            Err(IndexError::Dimension {
                expected: 3,
                found: 2
            })
        ));
        assert!(matches!(
            index.insert(&[1.0, f32::NAN, 0.0]),
            Err(IndexError::NonFinite)
        ));
        assert!(index.search(&[0.0; 3], 5, 10, None).unwrap().is_empty());
        assert!(matches!(
            index.search(&[0.0; 4], 5, 10, None),
            Err(IndexError::Dimension { .. })
        ));
    }

    #[test]
    fn batch_search_equals_single_searches() {
        let points = random_points(500, 8, 7);
        let index = build(&points, Metric::Cosine);
        let queries = random_points(16, 8, 8);
        let refs: Vec<&[f32]> = queries.iter().map(Vec::as_slice).collect();
        let batch = index.search_batch(&refs, 5, 32, None).unwrap();
        for (q, hits) in queries.iter().zip(batch) {
            assert_eq!(hits, index.search(q, 5, 32, None).unwrap());
        }
    }

    #[test]
    fn many_copies_of_few_vectors_are_still_found() {
        for quantize in [false, true] {
            let mut index = Hnsw::new(24, Metric::L2, HnswParams::default());
            let rows: Vec<Vec<f32>> = (0..3000u64)
                .map(|id| {
                    (0..24)
                        .map(|d| ((id * 31 + d * 7) % 97) as f32 / 9.7)
                        .collect()
                })
                .collect();
            let refs: Vec<&[f32]> = rows.iter().map(Vec::as_slice).collect();
            index.insert_batch(&refs).unwrap();
            if quantize {
                index.quantize();
            }
            for row in rows.iter().take(97) {
                let hit = index.search(row, 1, 64, None).unwrap()[0];
                assert_eq!(hit.distance, 0.0, "quantized: {quantize}");
            }
        }
    }
}
