//! A collection: points with a u64 id, a vector and a JSON payload, searchable with filters.
//! Replaced and deleted points stay in the graph as tombstones that searches skip, until a
//! compaction rebuilds it.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::filter::Filter;
use crate::{Hnsw, HnswParams, IndexError, Metric};

/// Fixed properties of a collection.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CollectionConfig {
    pub dim: usize,
    pub metric: Metric,
    pub hnsw: HnswParams,
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

struct Slot {
    id: u64,
    payload: Value,
}

/// Points in an HNSW graph, addressed by their own ids.
pub struct Collection {
    config: CollectionConfig,
    graph: Hnsw,
    /// Graph node → its point, `None` once replaced or deleted.
    slots: Vec<Option<Slot>>,
    /// Point id → graph node, ordered for scrolling.
    nodes: BTreeMap<u64, u32>,
}

/// Below this many estimated matches, a filtered search scans instead of walking the graph.
const EXACT_SCAN_MATCHES: usize = 2_000;
const SELECTIVITY_SAMPLE: usize = 1_000;

impl Collection {
    pub fn new(config: CollectionConfig) -> Self {
        Self {
            graph: Hnsw::new(config.dim, config.metric, config.hnsw),
            config,
            slots: Vec::new(),
            nodes: BTreeMap::new(),
        }
    }

    pub fn config(&self) -> &CollectionConfig {
        &self.config
    }

    /// Live points.
    pub fn count(&self) -> usize {
        self.nodes.len()
    }

    /// Inserts a point, or replaces the point with the same id.
    pub fn upsert(&mut self, id: u64, vector: &[f32], payload: Value) -> Result<(), IndexError> {
        let node = self.graph.insert(vector)?;
        if let Some(old) = self.nodes.insert(id, node) {
            self.slots[old as usize] = None;
        }
        self.slots.push(Some(Slot { id, payload }));
        Ok(())
    }

    /// Removes a point; returns whether it existed.
    pub fn delete(&mut self, id: u64) -> bool {
        match self.nodes.remove(&id) {
            Some(node) => {
                self.slots[node as usize] = None;
                true
            }
            None => false,
        }
    }

    fn point(&self, node: u32) -> Option<Point> {
        let slot = self.slots[node as usize].as_ref()?;
        Some(Point {
            id: slot.id,
            vector: self.graph.vector(node).to_vec(),
            payload: slot.payload.clone(),
        })
    }

    /// The point with this id (its vector as stored: normalized for cosine).
    pub fn get(&self, id: u64) -> Option<Point> {
        self.nodes.get(&id).and_then(|&node| self.point(node))
    }

    /// Up to `limit` points in id order, starting after `after`.
    pub fn scroll(&self, after: Option<u64>, limit: usize) -> Vec<Point> {
        let start = after.map_or(std::ops::Bound::Unbounded, std::ops::Bound::Excluded);
        self.nodes
            .range((start, std::ops::Bound::Unbounded))
            .take(limit)
            .filter_map(|(_, &node)| self.point(node))
            .collect()
    }

    fn accepts(&self, node: u32, filter: Option<&Filter>) -> bool {
        match &self.slots[node as usize] {
            Some(slot) => filter.is_none_or(|f| f.check(&slot.payload)),
            None => false,
        }
    }

    /// Estimated number of live points passing `filter`, from an even sample of slots.
    fn estimate_matches(&self, filter: &Filter) -> usize {
        let total = self.slots.len();
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
        let exact = filter.is_some_and(|f| self.estimate_matches(f) < EXACT_SCAN_MATCHES);
        let hits = if exact {
            self.graph.exact_search(query, k, Some(&accept))?
        } else {
            self.graph.search(query, k, ef, Some(&accept))?
        };
        Ok(hits
            .into_iter()
            .filter_map(|hit| {
                let slot = self.slots[hit.id as usize].as_ref()?;
                Some(ScoredPoint {
                    id: slot.id,
                    distance: hit.distance,
                    payload: slot.payload.clone(),
                })
            })
            .collect())
    }
}

impl Collection {
    pub(crate) fn graph(&self) -> &Hnsw {
        &self.graph
    }

    /// Each graph node's point id and payload, `None` for tombstones.
    pub(crate) fn slots(&self) -> impl Iterator<Item = Option<(u64, &Value)>> {
        self.slots
            .iter()
            .map(|s| s.as_ref().map(|s| (s.id, &s.payload)))
    }

    pub(crate) fn from_parts(
        config: CollectionConfig,
        graph: Hnsw,
        slots: Vec<Option<(u64, Value)>>,
    ) -> Result<Self, String> {
        if slots.len() != graph.len() {
            return Err(format!(
                "{} points for {} graph nodes",
                slots.len(),
                graph.len()
            ));
        }
        let mut nodes = BTreeMap::new();
        for (node, slot) in slots.iter().enumerate() {
            if let Some((id, _)) = slot
                && nodes.insert(*id, node as u32).is_some()
            {
                return Err(format!("point {id} is stored twice"));
            }
        }
        let slots = slots
            .into_iter()
            .map(|s| s.map(|(id, payload)| Slot { id, payload }))
            .collect();
        Ok(Self {
            config,
            graph,
            slots,
            nodes,
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
        let config = CollectionConfig {
            dim: 12,
            metric: Metric::L2,
            hnsw: HnswParams::default(),
        };
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
