//! Preallocated key/value cache.

use burn::tensor::{Device, Tensor};

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
            let updated = slot
                .take()
                .expect("cache slot is always refilled")
                .slice_assign([0..batch, 0..heads, start..end, 0..width], new);
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
