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
struct Scored {
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

/// An HNSW index over vectors of one dimension and metric. Ids are insertion order.
pub struct Hnsw {
    dim: usize,
    metric: Metric,
    params: HnswParams,
    vectors: Vec<f32>,
    layer0: Vec<u32>,
    upper: Vec<Vec<u32>>,
    levels: Vec<u8>,
    entry: Option<u32>,
    max_level: usize,
    rng: StdRng,
    visited_pool: Mutex<Vec<Visited>>,
}

const MAX_LEVEL: usize = 16;

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
            vectors: Vec::new(),
            layer0: Vec::new(),
            upper: Vec::new(),
            levels: Vec::new(),
            entry: None,
            max_level: 0,
            rng: StdRng::seed_from_u64(params.seed),
            visited_pool: Mutex::new(Vec::new()),
        }
    }

    pub fn len(&self) -> usize {
        self.levels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.levels.is_empty()
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    pub fn metric(&self) -> Metric {
        self.metric
    }

    /// The stored (for cosine: normalized) vector of `id`.
    pub fn vector(&self, id: u32) -> &[f32] {
        let start = id as usize * self.dim;
        &self.vectors[start..start + self.dim]
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

    fn block(&self, id: u32, level: usize) -> &[u32] {
        if level == 0 {
            let size = self.block0();
            &self.layer0[id as usize * size..(id as usize + 1) * size]
        } else {
            let size = self.block_upper();
            &self.upper[id as usize][(level - 1) * size..level * size]
        }
    }

    fn block_mut(&mut self, id: u32, level: usize) -> &mut [u32] {
        if level == 0 {
            let size = self.block0();
            &mut self.layer0[id as usize * size..(id as usize + 1) * size]
        } else {
            let size = self.block_upper();
            &mut self.upper[id as usize][(level - 1) * size..level * size]
        }
    }

    fn neighbors(&self, id: u32, level: usize) -> &[u32] {
        let block = self.block(id, level);
        &block[1..1 + block[0] as usize]
    }

    fn set_neighbors(&mut self, id: u32, level: usize, ids: impl ExactSizeIterator<Item = u32>) {
        let block = self.block_mut(id, level);
        block[0] = ids.len() as u32;
        for (slot, n) in block[1..].iter_mut().zip(ids) {
            *slot = n;
        }
    }

    fn distance_to(&self, query: &[f32], id: u32) -> f32 {
        self.metric.distance(query, self.vector(id))
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

    fn random_level(&mut self) -> usize {
        let multiplier = 1.0 / (self.params.m as f64).ln();
        let uniform: f64 = 1.0 - self.rng.random::<f64>(); // (0, 1]
        ((-uniform.ln() * multiplier) as usize).min(MAX_LEVEL)
    }

    /// Adds a vector and returns its id.
    pub fn insert(&mut self, vector: &[f32]) -> Result<u32, IndexError> {
        self.check(vector)?;
        let id = u32::try_from(self.len())
            .ok()
            .filter(|&id| id < u32::MAX)
            .ok_or(IndexError::Full(u32::MAX as usize))?;
        let mut stored = vector.to_vec();
        self.metric.prepare(&mut stored);
        self.vectors.extend_from_slice(&stored);
        let level = self.random_level();
        self.levels.push(level as u8);
        let block0 = self.block0();
        self.layer0.extend(std::iter::repeat_n(0, block0));
        self.upper.push(vec![0; level * self.block_upper()]);

        let Some(entry) = self.entry else {
            self.entry = Some(id);
            self.max_level = level;
            return Ok(id);
        };
        let mut nearest = Scored {
            distance: self.distance_to(&stored, entry),
            id: entry,
        };
        for l in (level + 1..=self.max_level).rev() {
            nearest = self.greedy(&stored, nearest, l);
        }
        for l in (0..=level.min(self.max_level)).rev() {
            let found = self.search_layer(&stored, nearest, self.params.ef_construction, l, None);
            let links = self.select_neighbors(&found, self.params.m);
            self.set_neighbors(id, l, links.iter().map(|s| s.id));
            for link in &links {
                self.connect(link.id, id, link.distance, l);
            }
            nearest = found[0];
        }
        if level > self.max_level {
            self.entry = Some(id);
            self.max_level = level;
        }
        Ok(id)
    }

    /// Adds `new` to the links of `node`, pruning with the heuristic when full.
    fn connect(&mut self, node: u32, new: u32, distance: f32, level: usize) {
        let max = self.max_links(level);
        let current = self.neighbors(node, level);
        if current.len() < max {
            let mut links = current.to_vec();
            links.push(new);
            self.set_neighbors(node, level, links.into_iter());
            return;
        }
        let base = self.vector(node);
        let mut candidates: Vec<Scored> = current
            .iter()
            .map(|&id| Scored {
                distance: self.metric.distance(base, self.vector(id)),
                id,
            })
            .collect();
        candidates.push(Scored { distance, id: new });
        candidates.sort_unstable();
        let kept = self.select_neighbors(&candidates, max);
        self.set_neighbors(node, level, kept.into_iter().map(|s| s.id));
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
            let diverse = kept
                .iter()
                .all(|k| self.metric.distance(vector, self.vector(k.id)) >= candidate.distance);
            if diverse {
                kept.push(*candidate);
            }
        }
        kept
    }

    fn greedy(&self, query: &[f32], mut nearest: Scored, level: usize) -> Scored {
        loop {
            let mut moved = false;
            for &n in self.neighbors(nearest.id, level) {
                let distance = self.distance_to(query, n);
                if distance < nearest.distance {
                    nearest = Scored { distance, id: n };
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
        query: &[f32],
        entry: Scored,
        ef: usize,
        level: usize,
        filter: Option<NodeFilter<'_>>,
    ) -> Vec<Scored> {
        let accept = |id: u32| filter.is_none_or(|f| f(id));
        let mut visited = self
            .visited_pool
            .lock()
            .map(|mut pool| pool.pop())
            .ok()
            .flatten()
            .unwrap_or_default();
        visited.reset(self.len());
        visited.insert(entry.id);
        let mut candidates = BinaryHeap::from([Reverse(entry)]);
        let mut results = BinaryHeap::new();
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
            for &n in self.neighbors(candidate.id, level) {
                if !visited.insert(n) {
                    continue;
                }
                let distance = self.distance_to(query, n);
                let worst = results.peek().map_or(f32::INFINITY, |w| w.distance);
                if results.len() < ef || distance < worst {
                    let scored = Scored { distance, id: n };
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

    /// The `k` nearest points to `query` (closest first), exploring `ef` candidates
    /// (at least `k`); `filter` restricts the results.
    pub fn search(
        &self,
        query: &[f32],
        k: usize,
        ef: usize,
        filter: Option<NodeFilter<'_>>,
    ) -> Result<Vec<Hit>, IndexError> {
        self.check(query)?;
        let Some(entry) = self.entry else {
            return Ok(Vec::new());
        };
        let mut query = query.to_vec();
        self.metric.prepare(&mut query);
        let mut nearest = Scored {
            distance: self.distance_to(&query, entry),
            id: entry,
        };
        for level in (1..=self.max_level).rev() {
            nearest = self.greedy(&query, nearest, level);
        }
        let found = self.search_layer(&query, nearest, ef.max(k), 0, filter);
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
        self.check(query)?;
        let mut query = query.to_vec();
        self.metric.prepare(&mut query);
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
}

/// The arrays of a graph, for saving and loading it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct HnswParts {
    pub vectors: Vec<f32>,
    pub levels: Vec<u8>,
    pub layer0: Vec<u32>,
    /// Every node's upper-layer blocks, concatenated in node order.
    pub upper: Vec<u32>,
    pub entry: Option<u32>,
}

impl Hnsw {
    pub(crate) fn params(&self) -> HnswParams {
        self.params
    }

    pub(crate) fn to_parts(&self) -> HnswParts {
        HnswParts {
            vectors: self.vectors.clone(),
            levels: self.levels.clone(),
            layer0: self.layer0.clone(),
            upper: self.upper.concat(),
            entry: self.entry,
        }
    }

    /// Rebuilds a graph from saved arrays, checking that they fit together so that a
    /// corrupt file cannot cause an out-of-bounds access later.
    pub(crate) fn from_parts(
        dim: usize,
        metric: Metric,
        params: HnswParams,
        parts: HnswParts,
    ) -> Result<Self, String> {
        let mut graph = Self::new(dim, metric, params);
        let n = parts.levels.len();
        if parts.vectors.len() != n * dim {
            return Err(format!(
                "{} vector values for {n} points of dimension {dim}",
                parts.vectors.len()
            ));
        }
        if parts.layer0.len() != n * graph.block0() {
            return Err("layer-0 links do not match the point count".into());
        }
        let upper_len: usize = parts
            .levels
            .iter()
            .map(|&l| l as usize * graph.block_upper())
            .sum();
        if parts.upper.len() != upper_len || parts.levels.iter().any(|&l| l as usize > MAX_LEVEL) {
            return Err("upper-layer links do not match the node levels".into());
        }
        let max_level = match parts.entry {
            Some(entry) if (entry as usize) < n => parts.levels[entry as usize] as usize,
            None if n == 0 => 0,
            _ => {
                return Err(format!(
                    "entry point {:?} is invalid for {n} points",
                    parts.entry
                ));
            }
        };
        if parts.levels.iter().any(|&l| l as usize > max_level) {
            return Err("a node lies above the entry point's level".into());
        }
        let mut rest = parts.upper.as_slice();
        graph.upper = parts
            .levels
            .iter()
            .map(|&l| {
                let (block, tail) = rest.split_at(l as usize * graph.block_upper());
                rest = tail;
                block.to_vec()
            })
            .collect();
        graph.vectors = parts.vectors;
        graph.layer0 = parts.layer0;
        graph.levels = parts.levels;
        graph.entry = parts.entry;
        graph.max_level = max_level;
        for id in 0..n as u32 {
            for level in 0..=graph.levels[id as usize] as usize {
                let block = graph.block(id, level);
                let count = block[0] as usize;
                if count > graph.max_links(level)
                    || block[1..1 + count].iter().any(|&x| x as usize >= n)
                {
                    return Err(format!("links of node {id} on layer {level} are invalid"));
                }
            }
        }
        // Fresh level draws after a reload; any seed keeps the graph valid.
        graph.rng = StdRng::seed_from_u64(params.seed.wrapping_add(n as u64));
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
}
