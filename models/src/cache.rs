//! Preallocated key/value cache.

use burn::tensor::{Device, IndexingUpdateOp, Int, Tensor, TensorData};

/// Keys and values of one attention layer: `[batch, kv_heads, capacity, key_dim or value_dim]`.
#[derive(Debug, Clone)]
struct LayerCache {
    // Held in an `Option` so `append` can move the tensor into `slice_assign`: a uniquely
    // owned buffer is updated in place instead of copied on every decode step.
    keys: Option<Tensor<4>>,
    values: Option<Tensor<4>>,
}

/// The cache of every layer, allocated once for `capacity` positions.
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<LayerCache>,
    len: usize,
    capacity: usize,
}

impl KvCache {
    /// A cache whose keys are `key_dim` wide and values `value_dim` wide per head (they
    /// differ where a layer caches something else, e.g. DeepSeek's compressed latents).
    pub fn new(
        layers: usize,
        batch: usize,
        kv_heads: usize,
        [key_dim, value_dim]: [usize; 2],
        capacity: usize,
        device: &Device,
    ) -> Self {
        let layer = || LayerCache {
            keys: Some(Tensor::zeros([batch, kv_heads, capacity, key_dim], device)),
            values: Some(Tensor::zeros(
                [batch, kv_heads, capacity, value_dim],
                device,
            )),
        };
        Self {
            layers: (0..layers).map(|_| layer()).collect(),
            len: 0,
            capacity,
        }
    }

    /// Positions already filled.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Forgets every position; the memory stays allocated.
    pub fn reset(&mut self) {
        self.len = 0;
    }

    /// Drops positions after `len` (for example to reuse a shared prompt prefix).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Writes `keys`/`values` `[batch, kv_heads, seq, head_dim]` of `layer` at the current
    /// length and returns everything cached for that layer, new entries included.
    pub fn append(
        &mut self,
        layer: usize,
        keys: Tensor<4>,
        values: Tensor<4>,
    ) -> (Tensor<4>, Tensor<4>) {
        let (start, end) = (self.len, self.len + keys.dims()[2]);
        let entry = &mut self.layers[layer];
        let write = |slot: &mut Option<Tensor<4>>, new: Tensor<4>| {
            let [batch, heads, _, width] = new.dims();
            let old = slot.take().expect("cache slot is always refilled");
            if start == 0 && old.dims() == new.dims() {
                // The whole cache at once (a training step's layer): nothing to copy into.
                *slot = Some(new.clone());
                return new;
            }
            let updated = old.slice_assign([0..batch, 0..heads, start..end, 0..width], new);
            let visible = updated
                .clone()
                .slice([0..batch, 0..heads, 0..end, 0..width]);
            *slot = Some(updated);
            visible
        };
        (
            write(&mut entry.keys, keys),
            write(&mut entry.values, values),
        )
    }

    /// Marks `seq` new positions as filled, once every layer has appended them.
    pub fn advance(&mut self, seq: usize) {
        self.len += seq;
    }
}

/// The caches of sequences decoded together (continuous batching): one row per sequence,
/// each with its own length. A sequence joins as its prefilled single-row [`KvCache`] and
/// leaves when it ends; each decode step appends one position to every row.
#[derive(Debug, Clone, Default)]
pub struct RaggedKvCache {
    /// `[rows, kv_heads, capacity, key_dim or value_dim]` per layer.
    layers: Vec<LayerCache>,
    lens: Vec<usize>,
    capacity: usize,
}

impl RaggedKvCache {
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of sequences.
    pub fn rows(&self) -> usize {
        self.lens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.lens.is_empty()
    }

    /// Positions filled in each row.
    pub fn lens(&self) -> &[usize] {
        &self.lens
    }

    /// Positions each row can hold (the widest capacity of the caches that joined).
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Adds a prefilled single-sequence cache as the last row. The narrower of the two
    /// capacities is padded to the wider.
    pub fn push(&mut self, cache: KvCache) {
        assert_eq!(
            cache
                .layers
                .first()
                .and_then(|l| l.keys.as_ref())
                .map(|k| k.dims()[0]),
            Some(1),
            "a row joins from a single-sequence cache"
        );
        if self.lens.is_empty() {
            self.layers = cache.layers;
            self.lens = vec![cache.len];
            self.capacity = cache.capacity;
            return;
        }
        let capacity = self.capacity.max(cache.capacity);
        for (ours, theirs) in self.layers.iter_mut().zip(cache.layers) {
            for (slot, row) in [
                (&mut ours.keys, theirs.keys),
                (&mut ours.values, theirs.values),
            ] {
                let (rows, row) = (slot.take().expect("filled"), row.expect("filled"));
                *slot = Some(Tensor::cat(
                    vec![widen(rows, capacity), widen(row, capacity)],
                    0,
                ));
            }
        }
        self.lens.push(cache.len);
        self.capacity = capacity;
    }

    /// Widens every row to hold `capacity` positions (no-op if they already do): caches
    /// grow as their sequences do rather than being sized for the longest request.
    pub fn grow_to(&mut self, capacity: usize) {
        if capacity <= self.capacity {
            return;
        }
        for layer in &mut self.layers {
            for slot in [&mut layer.keys, &mut layer.values] {
                let rows = slot.take().expect("filled");
                *slot = Some(widen(rows, capacity));
            }
        }
        self.capacity = capacity;
    }

    /// The only row as a single-sequence cache, leaving this one empty (for models that
    /// decode one sequence per pass; [`RaggedKvCache::push`] puts it back without a copy).
    pub fn take_single(&mut self) -> KvCache {
        assert_eq!(self.rows(), 1, "one row to take");
        let taken = std::mem::take(self);
        KvCache {
            layers: taken.layers,
            len: taken.lens[0],
            capacity: taken.capacity,
        }
    }

    /// Keeps the rows whose `keep` entry is true, in order.
    pub fn retain(&mut self, keep: &[bool]) {
        assert_eq!(keep.len(), self.lens.len(), "one flag per row");
        if keep.iter().all(|&k| k) {
            return;
        }
        let kept: Vec<i64> = (0..keep.len())
            .filter(|&r| keep[r])
            .map(|r| r as i64)
            .collect();
        if kept.is_empty() {
            *self = Self::default();
            return;
        }
        for layer in &mut self.layers {
            for slot in [&mut layer.keys, &mut layer.values] {
                let rows = slot.take().expect("filled");
                let index = Tensor::<1, Int>::from_data(
                    TensorData::new(kept.clone(), [kept.len()]),
                    &rows.device(),
                );
                *slot = Some(rows.select(0, index));
            }
        }
        self.lens = self
            .lens
            .iter()
            .zip(keep)
            .filter(|(_, k)| **k)
            .map(|(l, _)| *l)
            .collect();
    }

    /// Whether every row has room for one more position.
    pub fn has_room(&self) -> bool {
        self.lens.iter().all(|&len| len < self.capacity)
    }

    /// Writes `keys`/`values` `[rows, kv_heads, 1, width]` of `layer` at each row's length
    /// and returns every row's cache up to the longest row, new entries included.
    pub fn append(
        &mut self,
        layer: usize,
        keys: Tensor<4>,
        values: Tensor<4>,
    ) -> (Tensor<4>, Tensor<4>) {
        let visible = self.lens.iter().max().map_or(0, |m| m + 1);
        let lens: Vec<i64> = self.lens.iter().map(|&l| l as i64).collect();
        let entry = &mut self.layers[layer];
        let write = |slot: &mut Option<Tensor<4>>, new: Tensor<4>| {
            let [rows, heads, one, width] = new.dims();
            let positions =
                Tensor::<1, Int>::from_data(TensorData::new(lens.clone(), [rows]), &new.device())
                    .reshape([rows, 1, 1, 1])
                    .expand([rows, heads, one, width]);
            let updated = slot.take().expect("cache slot is always refilled").scatter(
                2,
                positions,
                new,
                IndexingUpdateOp::Assign,
            );
            let seen = updated
                .clone()
                .slice([0..rows, 0..heads, 0..visible, 0..width]);
            *slot = Some(updated);
            seen
        };
        (
            write(&mut entry.keys, keys),
            write(&mut entry.values, values),
        )
    }

    /// Additive attention mask `[rows, 1, 1, longest + 1]` for the position each row is
    /// about to write: `-inf` on keys past the row's own length and, with a sliding
    /// `window`, on keys `window` or more positions before it.
    pub fn attention_bias(&self, window: Option<usize>, device: &Device) -> Tensor<4> {
        let visible = self.lens.iter().max().map_or(0, |m| m + 1);
        let mut bias = vec![0f32; self.lens.len() * visible];
        for (row, &len) in self.lens.iter().enumerate() {
            for (key, b) in bias[row * visible..(row + 1) * visible]
                .iter_mut()
                .enumerate()
            {
                let too_old = window.is_some_and(|w| key + w <= len);
                if key > len || too_old {
                    *b = f32::NEG_INFINITY;
                }
            }
        }
        Tensor::from_data(
            TensorData::new(bias, [self.lens.len(), 1, 1, visible]),
            device,
        )
    }

    /// Marks one new position of every row as filled, once every layer has appended it.
    pub fn advance(&mut self) {
        for len in &mut self.lens {
            *len += 1;
        }
    }
}

/// `t` `[rows, heads, positions, width]` padded with zeros to `capacity` positions.
fn widen(t: Tensor<4>, capacity: usize) -> Tensor<4> {
    let [rows, heads, have, width] = t.dims();
    if have >= capacity {
        return t;
    }
    let padding = Tensor::zeros([rows, heads, capacity - have, width], &t.device());
    Tensor::cat(vec![t, padding], 2)
}
