//! A collection: points with a u64 id, a vector and a JSON payload, searchable with filters.
//!
//! Every array is a [`Column`], so a collection opened from a checkpoint works on the mapped
//! file: node → point id, a live flag per node, payload text per node, and the checkpoint's
//! id → node index as two sorted arrays searched by bisection. Writes since the checkpoint
//! live in a small ordered map that overrides that index. Replaced and deleted points stay
//! in the graph as tombstones that searches skip, until [`Collection::compacted`] rebuilds it.

use std::collections::BTreeMap;
use std::ops::Bound;

use rayon::prelude::*;
use serde_json::Value;

use crate::column::Column;
use crate::filter::Filter;
use crate::hnsw::{NodeFilter, Plan};
use crate::{Hnsw, HnswParams, IndexError, Metric};

/// How stored vectors are kept for the graph walk.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Quantization {
    /// Walk the f32 vectors.
    #[default]
    None,
    /// Walk 1-byte scalar codes and rescore the candidates with the f32 vectors. The
    /// ranges are fitted once the collection holds [`QUANTIZE_AFTER`] points, and refitted
    /// by compaction.
    Int8,
}

/// Points a collection holds before its int8 ranges are fitted.
pub const QUANTIZE_AFTER: usize = 1_000;

/// Fixed properties of a collection.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CollectionConfig {
    pub dim: usize,
    pub metric: Metric,
    pub hnsw: HnswParams,
    pub quantization: Quantization,
}

impl CollectionConfig {
    /// Default graph parameters and no quantization.
    pub fn new(dim: usize, metric: Metric) -> Self {
        Self {
            dim,
            metric,
            hnsw: HnswParams::default(),
            quantization: Quantization::None,
        }
    }
}

/// A stored point.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    pub id: u64,
    pub vector: Vec<f32>,
    pub payload: Value,
}

/// A search result: the point's id, its distance to the query and its payload.
#[derive(Debug, Clone, PartialEq)]
pub struct ScoredPoint {
    pub id: u64,
    pub distance: f32,
    pub payload: Value,
}

/// Points in an HNSW graph, addressed by their own ids.
pub struct Collection {
    config: CollectionConfig,
    pub(crate) graph: Hnsw,
    /// Per graph node: its point id, whether it is live, and where its payload text ends.
    pub(crate) node_ids: Column<u64>,
    pub(crate) live: Column<u8>,
    pub(crate) payload_ends: Column<u64>,
    pub(crate) payload_bytes: Column<u8>,
    /// The live points at the last checkpoint, sorted by id, and their nodes.
    pub(crate) sorted_ids: Column<u64>,
    pub(crate) sorted_nodes: Column<u32>,
    /// Writes since then: point id → its node, or `None` once deleted.
    changes: BTreeMap<u64, Option<u32>>,
    live_count: usize,
}

/// Below this many estimated matches, a filtered search scans instead of walking the graph.
const EXACT_SCAN_MATCHES: usize = 2_000;
const SELECTIVITY_SAMPLE: usize = 1_000;

impl Collection {
    pub fn new(config: CollectionConfig) -> Self {
        Self {
            graph: Hnsw::new(config.dim, config.metric, config.hnsw),
            config,
            node_ids: Column::default(),
            live: Column::default(),
            payload_ends: Column::default(),
            payload_bytes: Column::default(),
            sorted_ids: Column::default(),
            sorted_nodes: Column::default(),
            changes: BTreeMap::new(),
            live_count: 0,
        }
    }

    pub fn config(&self) -> &CollectionConfig {
        &self.config
    }

    /// Live points.
    pub fn count(&self) -> usize {
        self.live_count
    }

    /// Graph nodes, live or not: what compaction would reclaim is `nodes() - count()`.
    pub fn nodes(&self) -> usize {
        self.graph.len()
    }

    pub fn graph(&self) -> &Hnsw {
        &self.graph
    }

    /// The node of a live point.
    fn node_of(&self, id: u64) -> Option<u32> {
        if let Some(change) = self.changes.get(&id) {
            return *change;
        }
        let at = self.sorted_position(id);
        let node = (at < self.sorted_ids.len() && self.sorted_ids.get(at) == id)
            .then(|| self.sorted_nodes.get(at))?;
        // Checked so that a damaged index can only miss a point, never return another.
        ((node as usize) < self.graph.len() && self.node_ids.get(node as usize) == id)
            .then_some(node)
    }

    /// First position in the checkpoint's sorted ids holding an id ≥ `id`.
    fn sorted_position(&self, id: u64) -> usize {
        let (mut low, mut high) = (0, self.sorted_ids.len());
        while low < high {
            let mid = (low + high) / 2;
            if self.sorted_ids.get(mid) < id {
                low = mid + 1;
            } else {
                high = mid;
            }
        }
        low
    }

    fn is_live(&self, node: u32) -> bool {
        self.live.get(node as usize) == 1
    }

    fn payload(&self, node: u32) -> Value {
        let node = node as usize;
        let start = if node == 0 {
            0
        } else {
            self.payload_ends.get(node - 1)
        } as usize;
        let end = self.payload_ends.get(node) as usize;
        if start > end || end > self.payload_bytes.len() {
            return Value::Null;
        }
        serde_json::from_slice(self.payload_bytes.slice(start, end - start)).unwrap_or(Value::Null)
    }

    /// Inserts a point, or replaces the point with the same id.
    pub fn upsert(&mut self, id: u64, vector: &[f32], payload: Value) -> Result<(), IndexError> {
        self.upsert_batch(&[Point {
            id,
            vector: vector.to_vec(),
            payload,
        }])
    }

    /// Upserts many points, searching for their links in parallel (in order: a later
    /// point with the same id replaces an earlier one).
    pub fn upsert_batch(&mut self, points: &[Point]) -> Result<(), IndexError> {
        let mut rest = points;
        while !rest.is_empty() {
            let (chunk, tail) = rest.split_at(self.graph.chunk_size().min(rest.len()));
            let plans = self.plan_upserts(chunk)?;
            self.apply_upserts(chunk, plans)?;
            rest = tail;
        }
        self.quantize_when_due();
        Ok(())
    }

    /// The graph search for new points: shared access, so searches run beside it.
    pub(crate) fn plan_upserts(&self, points: &[Point]) -> Result<Vec<Plan>, IndexError> {
        let vectors: Vec<&[f32]> = points.iter().map(|p| p.vector.as_slice()).collect();
        self.graph.plan_batch(&vectors)
    }

    /// Adds planned points: exclusive access, but short.
    pub(crate) fn apply_upserts(
        &mut self,
        points: &[Point],
        plans: Vec<Plan>,
    ) -> Result<(), IndexError> {
        let nodes = self.graph.apply_batch(plans)?;
        for (point, node) in points.iter().zip(nodes) {
            match self.node_of(point.id) {
                Some(old) => self.live.set(old as usize, 0),
                None => self.live_count += 1,
            }
            self.node_ids.push(point.id);
            self.live.push(1);
            let text = point.payload.to_string();
            self.payload_bytes.extend_from_slice(text.as_bytes());
            self.payload_ends.push(self.payload_bytes.len() as u64);
            self.changes.insert(point.id, Some(node));
        }
        Ok(())
    }

    /// Fits the int8 codes once the collection is big enough, if its config asks for them.
    pub(crate) fn quantize_when_due(&mut self) {
        if self.config.quantization == Quantization::Int8
            && !self.graph.is_quantized()
            && self.graph.len() >= QUANTIZE_AFTER
        {
            self.graph.quantize();
        }
    }

    /// Removes a point; returns whether it existed.
    pub fn delete(&mut self, id: u64) -> bool {
        let Some(node) = self.node_of(id) else {
            return false;
        };
        self.live.set(node as usize, 0);
        self.live_count -= 1;
        self.changes.insert(id, None);
        true
    }

    fn point(&self, node: u32) -> Point {
        Point {
            id: self.node_ids.get(node as usize),
            vector: self.graph.vector(node).to_vec(),
            payload: self.payload(node),
        }
    }

    /// The point with this id (its vector as stored: normalized for cosine).
    pub fn get(&self, id: u64) -> Option<Point> {
        self.node_of(id).map(|node| self.point(node))
    }

    /// Live `(id, node)` pairs in id order, after `after`: the checkpoint's sorted index
    /// merged with the changes since, which win where both hold an id.
    fn live_nodes(&self, after: Option<u64>) -> impl Iterator<Item = (u64, u32)> + '_ {
        let start = match after {
            None => 0,
            Some(u64::MAX) => self.sorted_ids.len(),
            Some(a) => self.sorted_position(a + 1),
        };
        let mut base = (start..self.sorted_ids.len())
            .map(|i| (self.sorted_ids.get(i), self.sorted_nodes.get(i)))
            .peekable();
        let lower = after.map_or(Bound::Unbounded, Bound::Excluded);
        let mut changed = self.changes.range((lower, Bound::Unbounded)).peekable();
        std::iter::from_fn(move || {
            loop {
                let next_base = base.peek().map(|&(id, _)| id);
                let next_change = changed.peek().map(|(id, _)| **id);
                let take_change = match (next_base, next_change) {
                    (None, None) => return None,
                    (Some(b), Some(c)) => c <= b,
                    (None, Some(_)) => true,
                    (Some(_), None) => false,
                };
                if take_change {
                    let (&id, &node) = changed.next()?;
                    if next_base == Some(id) {
                        base.next();
                    }
                    if let Some(node) = node {
                        return Some((id, node));
                    }
                } else {
                    let (id, node) = base.next()?;
                    if (node as usize) < self.graph.len() && self.node_ids.get(node as usize) == id
                    {
                        return Some((id, node));
                    }
                }
            }
        })
    }

    /// Up to `limit` points in id order, starting after `after`.
    pub fn scroll(&self, after: Option<u64>, limit: usize) -> Vec<Point> {
        self.live_nodes(after)
            .take(limit)
            .map(|(_, node)| self.point(node))
            .collect()
    }

    fn accepts(&self, node: u32, filter: Option<&Filter>) -> bool {
        self.is_live(node) && filter.is_none_or(|f| f.check(&self.payload(node)))
    }

    /// Estimated number of live points passing `filter`, from an even sample of nodes.
    fn estimate_matches(&self, filter: &Filter) -> usize {
        let total = self.graph.len();
        if total == 0 {
            return 0;
        }
        let step = total.div_ceil(SELECTIVITY_SAMPLE).max(1);
        let sampled = (0..total).step_by(step);
        let size = sampled.len();
        let hits = sampled
            .filter(|&n| self.accepts(n as u32, Some(filter)))
            .count();
        hits * total / size
    }

    /// The `k` nearest live points passing `filter`. The filter is applied during the graph
    /// walk; when it admits only a few points, an exact scan of those is cheaper and exact.
    pub fn search(
        &self,
        query: &[f32],
        k: usize,
        ef: usize,
        filter: Option<&Filter>,
    ) -> Result<Vec<ScoredPoint>, IndexError> {
        let accept = |node: u32| self.accepts(node, filter);
        // Without a filter or tombstones every node is a result: skip the per-node check.
        let check = (filter.is_some() || self.count() < self.nodes()).then_some(&accept);
        let check = check.map(|f| f as NodeFilter<'_>);
        let exact = filter.is_some_and(|f| self.estimate_matches(f) < EXACT_SCAN_MATCHES);
        let hits = if exact {
            self.graph.exact_search(query, k, check)?
        } else {
            self.graph.search(query, k, ef, check)?
        };
        Ok(hits
            .into_iter()
            .map(|hit| ScoredPoint {
                id: self.node_ids.get(hit.id as usize),
                distance: hit.distance,
                payload: self.payload(hit.id),
            })
            .collect())
    }

    /// [`search`](Self::search) for many queries in parallel.
    pub fn search_batch(
        &self,
        queries: &[&[f32]],
        k: usize,
        ef: usize,
        filter: Option<&Filter>,
    ) -> Result<Vec<Vec<ScoredPoint>>, IndexError> {
        queries
            .par_iter()
            .map(|q| self.search(q, k, ef, filter))
            .collect()
    }

    /// A new collection holding only the live points, in a freshly built graph (with
    /// freshly fitted int8 ranges): what compaction writes.
    pub fn compacted(&self) -> Result<Collection, IndexError> {
        let mut fresh = Collection::new(self.config);
        let mut nodes: Vec<u32> = self.live_nodes(None).map(|(_, node)| node).collect();
        // Insertion in the old node order keeps the build close to the original one.
        nodes.sort_unstable();
        let points: Vec<Point> = nodes.into_iter().map(|node| self.point(node)).collect();
        fresh.upsert_batch(&points)?;
        if fresh.config.quantization == Quantization::Int8 && !fresh.graph.is_quantized() {
            fresh.graph.quantize();
        }
        Ok(fresh)
    }

    /// The live points' ids and nodes in id order, for a checkpoint's sorted index.
    pub(crate) fn sorted_index(&self) -> (Vec<u64>, Vec<u32>) {
        self.live_nodes(None).unzip()
    }

    /// A collection over saved (usually memory-mapped) columns.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn from_columns(
        config: CollectionConfig,
        graph: Hnsw,
        node_ids: Column<u64>,
        live: Column<u8>,
        payload_ends: Column<u64>,
        payload_bytes: Column<u8>,
        sorted_ids: Column<u64>,
        sorted_nodes: Column<u32>,
    ) -> Result<Self, String> {
        let n = graph.len();
        if node_ids.len() != n || live.len() != n || payload_ends.len() != n {
            return Err(format!("point records do not match the {n} graph nodes"));
        }
        if sorted_ids.len() != sorted_nodes.len() {
            return Err("the id index is inconsistent".into());
        }
        Ok(Self {
            config,
            graph,
            node_ids,
            live,
            payload_ends,
            payload_bytes,
            live_count: sorted_ids.len(),
            sorted_ids,
            sorted_nodes,
            changes: BTreeMap::new(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use serde_json::json;

    fn collection(n: u64, seed: u64) -> (Collection, Vec<Vec<f32>>) {
        let config = CollectionConfig::new(12, Metric::L2);
        let mut c = Collection::new(config);
        let mut rng = StdRng::seed_from_u64(seed);
        let mut vectors = Vec::new();
        for id in 0..n {
            let v: Vec<f32> = (0..12).map(|_| rng.random::<f32>()).collect();
            let group = ["a", "b", "c"][(id % 3) as usize];
            let payload = json!({"group": group, "rank": id, "even": id % 2 == 0});
            c.upsert(id * 10, &v, payload).unwrap();
            vectors.push(v);
        }
        (c, vectors)
    }

    /// Brute force over the live points with the same filter.
    fn brute_force(c: &Collection, query: &[f32], k: usize, filter: Option<&Filter>) -> Vec<u64> {
        let mut all: Vec<(f32, u64)> = c
            .scroll(None, usize::MAX)
            .into_iter()
            .filter(|p| filter.is_none_or(|f| f.check(&p.payload)))
            .map(|p| (Metric::L2.distance(query, &p.vector), p.id))
            .collect();
        all.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        all.into_iter().take(k).map(|(_, id)| id).collect()
    }

    #[test]
    fn filtered_search_equals_brute_force() {
        let (c, _) = collection(3000, 1);
        let filters = [
            Filter::matches("group", "b"),
            Filter::range("rank", Some(100.0), Some(400.0)),
            Filter::And(vec![
                Filter::matches("even", true),
                Filter::Not(Box::new(Filter::matches("group", "a"))),
            ]),
            Filter::Or(vec![
                Filter::matches("rank", 7),
                Filter::matches("rank", 2500),
            ]),
        ];
        let mut rng = StdRng::seed_from_u64(9);
        for filter in &filters {
            for _ in 0..10 {
                let q: Vec<f32> = (0..12).map(|_| rng.random::<f32>()).collect();
                let found: Vec<u64> = c
                    .search(&q, 10, 3000, Some(filter))
                    .unwrap()
                    .iter()
                    .map(|p| p.id)
                    .collect();
                assert_eq!(found, brute_force(&c, &q, 10, Some(filter)), "{filter:?}");
            }
        }
    }

    #[test]
    fn upsert_replaces_and_delete_removes() {
        let (mut c, vectors) = collection(500, 2);
        assert_eq!(c.count(), 500);
        // Move point 30 onto point 40's vector: a search there finds both, once each.
        c.upsert(30, &vectors[4], json!({"moved": true})).unwrap();
        assert_eq!(c.count(), 500);
        assert_eq!(c.get(30).unwrap().payload, json!({"moved": true}));
        let near: Vec<u64> = c
            .search(&vectors[4], 2, 64, None)
            .unwrap()
            .iter()
            .map(|p| p.id)
            .collect();
        assert_eq!(near.len(), 2);
        assert!(near.contains(&30) && near.contains(&40));
        assert!(c.delete(40));
        assert!(!c.delete(40));
        assert!(c.get(40).is_none());
        assert_eq!(c.count(), 499);
        for v in &vectors {
            let hits = c.search(v, 10, 64, None).unwrap();
            assert!(hits.iter().all(|p| p.id != 40));
        }
    }

    #[test]
    fn scroll_pages_in_id_order() {
        let (c, _) = collection(25, 3);
        let first = c.scroll(None, 10);
        let second = c.scroll(Some(first.last().unwrap().id), 10);
        let ids: Vec<u64> = first.iter().chain(&second).map(|p| p.id).collect();
        assert_eq!(ids, (0..20).map(|i| i * 10).collect::<Vec<_>>());
    }
}
