//! Caches in front of generation and of the RAG pipeline.
//!
//! - [`InferenceCache`]: an in-process LRU of generated texts, keyed by everything that
//!   determines a generation ([`InferenceKey`]); only deterministic requests are cached.
//! - [`ResultCache`]: a string cache with a time to live for whole RAG answers, keyed by
//!   [`result_cache_key`]; in process ([`MemoryResultCache`]) or in Redis
//!   (`RedisResultCache`, cargo feature `redis`), which degrades to misses when Redis is down.
//!
//! ```
//! use std::time::Duration;
//! use moera_engine::rag::cache::{result_cache_key, MemoryResultCache, ResultCache};
//!
//! let cache = MemoryResultCache::new(1000, Duration::from_secs(3600));
//! let key = result_cache_key(&["What is a crate?", "rust-book", "5", "{}", "smollm2"]);
//! assert_eq!(cache.get(&key), None);
//! cache.put(&key, r#"{"answer":"A compilation unit."}"#);
//! assert_eq!(cache.get(&key).as_deref(), Some(r#"{"answer":"A compilation unit."}"#));
//! ```

use std::borrow::Borrow;
use std::collections::HashMap;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::rag::breaker::{Clock, SystemClock, lock};
use crate::sampler::SamplingParams;

/// Time to live of cached RAG answers unless configured otherwise: one hour.
pub const DEFAULT_TTL: Duration = Duration::from_secs(3600);

/// Counters of a cache.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheStats {
    pub hits: u64,
    /// Lookups that found nothing, or only an expired entry.
    pub misses: u64,
    /// Requests that cannot be cached ([`InferenceCache`]: non-deterministic sampling); they
    /// count neither as hits nor as misses.
    pub bypassed: u64,
    /// Entries dropped to make room.
    pub evictions: u64,
    /// Entries dropped because their time to live had passed.
    pub expirations: u64,
    pub entries: usize,
    pub capacity: usize,
}

// ---------------------------------------------------------------------------------------------
// LRU map
// ---------------------------------------------------------------------------------------------

const NIL: usize = usize::MAX;

struct Node<K: ?Sized, V> {
    key: Arc<K>,
    value: V,
    /// Towards the most recently used end.
    prev: usize,
    /// Towards the least recently used end.
    next: usize,
}

/// A bounded map that drops its least recently used entry when full: a hash map into a
/// doubly linked list kept in a dense vector (O(1) lookup, touch, insert and eviction). The
/// key is shared between map and list through an `Arc`, so a long prompt is stored once.
struct Lru<K: ?Sized, V> {
    map: HashMap<Arc<K>, usize>,
    nodes: Vec<Node<K, V>>,
    head: usize,
    tail: usize,
    capacity: usize,
}

impl<K: Hash + Eq + ?Sized, V> Lru<K, V> {
    fn new(capacity: usize) -> Self {
        Self {
            // Bounded so that a huge configured capacity does not allocate up front.
            map: HashMap::with_capacity(capacity.min(1024)),
            nodes: Vec::with_capacity(capacity.min(1024)),
            head: NIL,
            tail: NIL,
            capacity,
        }
    }

    fn len(&self) -> usize {
        self.nodes.len()
    }

    /// The value of `key`, marked as most recently used.
    fn get<Q>(&mut self, key: &Q) -> Option<&mut V>
    where
        Arc<K>: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let i = *self.map.get(key)?;
        self.touch(i);
        Some(&mut self.nodes[i].value)
    }

    /// Inserts or replaces `key`; returns how many entries were evicted to make room.
    fn insert(&mut self, key: Arc<K>, value: V) -> usize {
        if self.capacity == 0 {
            return 0;
        }
        if let Some(&i) = self.map.get(&*key) {
            self.nodes[i].value = value;
            self.touch(i);
            return 0;
        }
        let mut evicted = 0;
        while self.nodes.len() >= self.capacity && self.tail != NIL {
            self.remove_at(self.tail);
            evicted += 1;
        }
        let i = self.nodes.len();
        self.nodes.push(Node {
            key: Arc::clone(&key),
            value,
            prev: NIL,
            next: NIL,
        });
        self.map.insert(key, i);
        self.push_front(i);
        evicted
    }

    fn remove<Q>(&mut self, key: &Q) -> Option<V>
    where
        Arc<K>: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let i = *self.map.get(key)?;
        Some(self.remove_at(i))
    }

    fn clear(&mut self) {
        self.map.clear();
        self.nodes.clear();
        self.head = NIL;
        self.tail = NIL;
    }

    fn detach(&mut self, i: usize) {
        let (prev, next) = (self.nodes[i].prev, self.nodes[i].next);
        if prev == NIL {
            self.head = next;
        } else {
            self.nodes[prev].next = next;
        }
        if next == NIL {
            self.tail = prev;
        } else {
            self.nodes[next].prev = prev;
        }
    }

    fn push_front(&mut self, i: usize) {
        self.nodes[i].prev = NIL;
        self.nodes[i].next = self.head;
        if self.head == NIL {
            self.tail = i;
        } else {
            self.nodes[self.head].prev = i;
        }
        self.head = i;
    }

    fn touch(&mut self, i: usize) {
        if self.head != i {
            self.detach(i);
            self.push_front(i);
        }
    }

    /// Unlinks node `i` and fills its slot with the last node (keeping the vector dense).
    fn remove_at(&mut self, i: usize) -> V {
        self.detach(i);
        let node = self.nodes.swap_remove(i);
        self.map.remove(&node.key);
        if i < self.nodes.len() {
            // The former last node now lives at `i`: repoint its neighbours and its map entry.
            let (prev, next) = (self.nodes[i].prev, self.nodes[i].next);
            if prev == NIL {
                self.head = i;
            } else {
                self.nodes[prev].next = i;
            }
            if next == NIL {
                self.tail = i;
            } else {
                self.nodes[next].prev = i;
            }
            if let Some(slot) = self.map.get_mut(&self.nodes[i].key) {
                *slot = i;
            }
        }
        node.value
    }
}

// ---------------------------------------------------------------------------------------------
// Inference cache
// ---------------------------------------------------------------------------------------------

/// Everything that determines the text a generation produces.
#[derive(Debug, Clone)]
pub struct InferenceKey {
    /// Model identity (alias, path or hub id).
    pub model: String,
    /// Name of the LoRA adapter in use, if any.
    pub adapter: Option<String>,
    /// The prompt after the chat template, or the raw prompt.
    pub prompt: String,
    pub sampling: SamplingParams,
    pub max_tokens: usize,
    pub stop: Vec<String>,
}

/// Bit patterns of the sampling parameters that influence the output, so that keys can be
/// hashed and compared exactly. Greedy decoding only depends on the repetition penalty (it
/// applies before the argmax); truncation and seed cannot change an argmax.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum SamplingBits {
    Greedy {
        repetition_penalty: u32,
    },
    Sampled {
        temperature: u32,
        top_k: usize,
        top_p: u32,
        min_p: u32,
        repetition_penalty: u32,
        seed: Option<u64>,
    },
}

/// `-0.0` and `0.0` sample alike, so they must key alike.
fn float_bits(x: f32) -> u32 {
    if x == 0.0 { 0 } else { x.to_bits() }
}

impl InferenceKey {
    pub fn new(
        model: impl Into<String>,
        adapter: Option<String>,
        prompt: impl Into<String>,
        sampling: SamplingParams,
        max_tokens: usize,
        stop: Vec<String>,
    ) -> Self {
        Self {
            model: model.into(),
            adapter,
            prompt: prompt.into(),
            sampling,
            max_tokens,
            stop,
        }
    }

    /// Whether the same key always produces the same text: greedy decoding, or sampling
    /// from a fixed seed.
    pub fn is_deterministic(&self) -> bool {
        self.sampling.is_greedy() || self.sampling.seed.is_some()
    }

    fn sampling_bits(&self) -> SamplingBits {
        let s = &self.sampling;
        if s.is_greedy() {
            SamplingBits::Greedy {
                repetition_penalty: float_bits(s.repetition_penalty),
            }
        } else {
            SamplingBits::Sampled {
                temperature: float_bits(s.temperature),
                top_k: s.top_k,
                top_p: float_bits(s.top_p),
                min_p: float_bits(s.min_p),
                repetition_penalty: float_bits(s.repetition_penalty),
                seed: s.seed,
            }
        }
    }
}

impl PartialEq for InferenceKey {
    fn eq(&self, other: &Self) -> bool {
        self.model == other.model
            && self.adapter == other.adapter
            && self.max_tokens == other.max_tokens
            && self.stop == other.stop
            && self.sampling_bits() == other.sampling_bits()
            && self.prompt == other.prompt
    }
}

impl Eq for InferenceKey {}

impl Hash for InferenceKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.model.hash(state);
        self.adapter.hash(state);
        self.prompt.hash(state);
        self.sampling_bits().hash(state);
        self.max_tokens.hash(state);
        self.stop.hash(state);
    }
}

struct InferenceInner<V> {
    lru: Lru<InferenceKey, V>,
    stats: CacheStats,
}

/// A thread-safe LRU of generation results (`V` is typically the generated `String`).
///
/// Only keys for which [`InferenceKey::is_deterministic`] holds are stored or looked up;
/// others bypass the cache. A capacity of 0 disables it.
pub struct InferenceCache<V = String> {
    inner: Mutex<InferenceInner<V>>,
}

impl<V> fmt::Debug for InferenceCache<V> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InferenceCache")
            .field("stats", &lock(&self.inner).stats_snapshot())
            .finish()
    }
}

impl<V> InferenceInner<V> {
    fn stats_snapshot(&self) -> CacheStats {
        CacheStats {
            entries: self.lru.len(),
            capacity: self.lru.capacity,
            ..self.stats
        }
    }
}

impl<V: Clone> InferenceCache<V> {
    pub fn new(capacity: usize) -> Self {
        Self {
            inner: Mutex::new(InferenceInner {
                lru: Lru::new(capacity),
                stats: CacheStats::default(),
            }),
        }
    }

    /// The cached result of `key`, marking it as most recently used.
    pub fn get(&self, key: &InferenceKey) -> Option<V> {
        let mut inner = lock(&self.inner);
        if !key.is_deterministic() {
            inner.stats.bypassed += 1;
            return None;
        }
        match inner.lru.get(key).cloned() {
            Some(value) => {
                inner.stats.hits += 1;
                Some(value)
            }
            None => {
                inner.stats.misses += 1;
                None
            }
        }
    }

    /// Stores `value` for `key`; returns `false` (and stores nothing) when the key is not
    /// deterministic or the capacity is 0.
    pub fn put(&self, key: InferenceKey, value: V) -> bool {
        let mut inner = lock(&self.inner);
        if !key.is_deterministic() {
            inner.stats.bypassed += 1;
            return false;
        }
        if inner.lru.capacity == 0 {
            return false;
        }
        let evicted = inner.lru.insert(Arc::new(key), value);
        inner.stats.evictions += evicted as u64;
        true
    }

    pub fn len(&self) -> usize {
        lock(&self.inner).lru.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn capacity(&self) -> usize {
        lock(&self.inner).lru.capacity
    }

    /// Drops every entry (counters are kept).
    pub fn clear(&self) {
        lock(&self.inner).lru.clear();
    }

    pub fn stats(&self) -> CacheStats {
        lock(&self.inner).stats_snapshot()
    }
}

// ---------------------------------------------------------------------------------------------
// Result caches
// ---------------------------------------------------------------------------------------------

/// A cache of serialized RAG answers. The time to live is a property of the cache.
/// Implementations never fail: a broken backend behaves as an empty cache.
pub trait ResultCache: Send + Sync {
    fn get(&self, key: &str) -> Option<String>;
    fn put(&self, key: &str, value: &str);
}

/// The cache key of whatever identifies a RAG answer (question, collection, k, filter JSON,
/// model, ...): the SHA-256 hex digest of the parts, each prefixed with its length so that
/// `["ab", "c"]` and `["a", "bc"]` differ.
pub fn result_cache_key(parts: &[&str]) -> String {
    let mut hasher = Sha256::new();
    hasher.update(b"moera-result-v1");
    hasher.update((parts.len() as u64).to_le_bytes());
    for part in parts {
        hasher.update((part.len() as u64).to_le_bytes());
        hasher.update(part.as_bytes());
    }
    format!("{:x}", hasher.finalize())
}

struct Timed {
    value: String,
    /// `None`: the TTL reaches past what an [`Instant`] can represent, so never.
    expires_at: Option<Instant>,
}

struct MemoryInner {
    lru: Lru<str, Timed>,
    stats: CacheStats,
}

/// An in-process [`ResultCache`]: LRU eviction at capacity, entries expire `ttl` after they
/// were written (checked on read). A capacity or TTL of 0 stores nothing; a TTL too long to
/// represent never expires.
pub struct MemoryResultCache {
    ttl: Duration,
    clock: Box<dyn Clock>,
    inner: Mutex<MemoryInner>,
}

impl fmt::Debug for MemoryResultCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryResultCache")
            .field("ttl", &self.ttl)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl MemoryResultCache {
    pub fn new(capacity: usize, ttl: Duration) -> Self {
        Self {
            ttl,
            clock: Box::new(SystemClock),
            inner: Mutex::new(MemoryInner {
                lru: Lru::new(capacity),
                stats: CacheStats::default(),
            }),
        }
    }

    /// Replaces the clock (tests use [`ManualClock`](crate::rag::breaker::ManualClock)).
    pub fn with_clock(mut self, clock: impl Clock + 'static) -> Self {
        self.clock = Box::new(clock);
        self
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Entries held, including expired ones not yet read.
    pub fn len(&self) -> usize {
        lock(&self.inner).lru.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn stats(&self) -> CacheStats {
        let inner = lock(&self.inner);
        CacheStats {
            entries: inner.lru.len(),
            capacity: inner.lru.capacity,
            ..inner.stats
        }
    }
}

impl ResultCache for MemoryResultCache {
    fn get(&self, key: &str) -> Option<String> {
        let now = self.clock.now();
        let mut inner = lock(&self.inner);
        let found = inner.lru.get(key).map(|entry| {
            entry
                .expires_at
                .is_none_or(|t| now < t)
                .then(|| entry.value.clone())
        });
        match found {
            Some(Some(value)) => {
                inner.stats.hits += 1;
                Some(value)
            }
            Some(None) => {
                inner.lru.remove(key);
                inner.stats.expirations += 1;
                inner.stats.misses += 1;
                None
            }
            None => {
                inner.stats.misses += 1;
                None
            }
        }
    }

    fn put(&self, key: &str, value: &str) {
        if self.ttl.is_zero() {
            return;
        }
        // A huge configured TTL (e.g. 1e19 s) must not panic: such an entry never expires.
        let expires_at = self.clock.now().checked_add(self.ttl);
        let mut inner = lock(&self.inner);
        let evicted = inner.lru.insert(
            Arc::from(key),
            Timed {
                value: value.to_owned(),
                expires_at,
            },
        );
        inner.stats.evictions += evicted as u64;
    }
}

#[cfg(feature = "redis")]
pub use self::redis_cache::RedisResultCache;

#[cfg(feature = "redis")]
mod redis_cache {
    use std::fmt;
    use std::sync::Mutex;
    use std::time::{Duration, Instant};

    use super::ResultCache;
    use crate::error::{Error, Result};
    use crate::rag::breaker::lock;

    /// Limit on connecting, and on each command's request and response: a slow or absent
    /// Redis must cost a request at most this much before it turns into a miss.
    const IO_TIMEOUT: Duration = Duration::from_secs(1);
    /// First and largest pause between reconnection attempts during an outage (doubling).
    const RECONNECT_MIN: Duration = Duration::from_millis(500);
    const RECONNECT_MAX: Duration = Duration::from_secs(30);

    struct State {
        conn: Option<redis::Connection>,
        /// Set while Redis is unreachable: warn once when it starts, not on every call.
        outage_since: Option<Instant>,
        next_attempt: Option<Instant>,
        backoff: Duration,
    }

    /// A [`ResultCache`] in Redis (`SET key value EX ttl`, `GET key`), shared by every
    /// process using the same server and key prefix.
    ///
    /// Calls are blocking (at most about one second each; call them from a blocking context
    /// in async code) and never fail: while Redis is unreachable, reads miss and writes are
    /// dropped, with one warning per outage, and reconnection is retried with a backoff.
    pub struct RedisResultCache {
        client: redis::Client,
        /// The URL without its password, for logs.
        display_url: String,
        ttl: Duration,
        key_prefix: String,
        reconnect_min: Duration,
        state: Mutex<State>,
    }

    impl fmt::Debug for RedisResultCache {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.debug_struct("RedisResultCache")
                .field("url", &self.display_url)
                .field("ttl", &self.ttl)
                .field("key_prefix", &self.key_prefix)
                .finish_non_exhaustive()
        }
    }

    /// Query parameters that carry a password (`redis+unix:///run/redis.sock?pass=...`),
    /// compared without case after percent-decoding the name.
    const PASSWORD_PARAMS: [&str; 4] = ["pass", "password", "passwd", "pwd"];

    /// The URL without its secrets, for logs and errors: the user information of
    /// `redis://user:password@host/` (→ `redis://***@host/`) and the value of every password
    /// query parameter (`?db=0&pass=secret` → `?db=0&pass=***`). Works on malformed URLs
    /// too, erring on the side of hiding too much.
    pub(super) fn redact_url(url: &str) -> String {
        // Query first: a password value may itself hold an `@`. Parameters are split at
        // `&` and at any further `?` (an unencoded `?` in the user information must not
        // hide a password parameter behind it).
        let url = match url.split_once('?') {
            Some((base, query)) => {
                let mut redacted = format!("{base}?");
                for param in query.split_inclusive(['&', '?']) {
                    let (param, separator) = match param.strip_suffix(['&', '?']) {
                        Some(p) => (p, &param[p.len()..]),
                        None => (param, ""),
                    };
                    match param.split_once('=') {
                        Some((name, _)) if is_password_param(name) => {
                            redacted.push_str(name);
                            redacted.push_str("=***");
                        }
                        _ => redacted.push_str(param),
                    }
                    redacted.push_str(separator);
                }
                redacted
            }
            None => url.to_owned(),
        };
        // Then the user information: everything between `://` and the last `@`, which also
        // covers an unencoded `@`, `/` or `?` inside the password.
        match (url.find("://"), url.rfind('@')) {
            (Some(scheme_end), Some(at)) if at > scheme_end => {
                format!("{}***{}", &url[..scheme_end + 3], &url[at..])
            }
            _ => url,
        }
    }

    fn is_password_param(name: &str) -> bool {
        let name = percent_decode(name.trim());
        PASSWORD_PARAMS.iter().any(|p| name.eq_ignore_ascii_case(p))
    }

    /// `%XX` escapes and `+` (a space in a query) decoded, as the URL parser of `redis`
    /// reads parameter names; invalid escapes stay as written.
    fn percent_decode(s: &str) -> String {
        let bytes = s.as_bytes();
        let mut out = Vec::with_capacity(bytes.len());
        let mut i = 0;
        while i < bytes.len() {
            let hex = |b: u8| (b as char).to_digit(16);
            match bytes[i] {
                b'%' if i + 2 < bytes.len() => match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                    (Some(h), Some(l)) => {
                        out.push((h * 16 + l) as u8);
                        i += 3;
                        continue;
                    }
                    _ => out.push(b'%'),
                },
                b'+' => out.push(b' '),
                b => out.push(b),
            }
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    }

    /// TTLs beyond this (about 31 700 years) are stored without an expiry: Redis refuses
    /// expiry times past `i64::MAX` milliseconds from now.
    const MAX_REDIS_TTL: Duration = Duration::from_secs(1_000_000_000_000);

    /// The expiry arguments of `SET` for `ttl`: `EX` in whole seconds, `PX` in milliseconds
    /// for a fractional TTL, none for a TTL too long for Redis (the entry never expires).
    pub(super) fn expiry_args(ttl: Duration) -> Option<(&'static str, u64)> {
        if ttl > MAX_REDIS_TTL {
            None
        } else if ttl.subsec_nanos() == 0 {
            Some(("EX", ttl.as_secs()))
        } else {
            // At most 1e15 ms here, so the conversion cannot truncate.
            Some((
                "PX",
                u64::try_from(ttl.as_millis().max(1)).unwrap_or(u64::MAX),
            ))
        }
    }

    impl RedisResultCache {
        /// A cache in the Redis at `url` (`redis://[:password@]host[:port][/db]`), whose
        /// entries live `ttl` and whose keys start with `key_prefix`. Fails only on a
        /// malformed URL; an unreachable server is logged and retried later.
        pub fn connect(url: &str, ttl: Duration, key_prefix: impl Into<String>) -> Result<Self> {
            let display_url = redact_url(url);
            // The URL may hold a password: the error names only the redacted form.
            let client = redis::Client::open(url).map_err(|e| {
                Error::InvalidArgument(format!(
                    "invalid Redis URL {display_url}: {}",
                    e.detail().unwrap_or("cannot parse it")
                ))
            })?;
            let cache = Self {
                client,
                display_url,
                ttl,
                key_prefix: key_prefix.into(),
                reconnect_min: RECONNECT_MIN,
                state: Mutex::new(State {
                    conn: None,
                    outage_since: None,
                    next_attempt: None,
                    backoff: RECONNECT_MIN,
                }),
            };
            {
                let mut state = lock(&cache.state);
                cache.ensure_connected(&mut state);
            }
            Ok(cache)
        }

        pub fn ttl(&self) -> Duration {
            self.ttl
        }

        /// Whether the last attempt to reach Redis succeeded.
        pub fn is_connected(&self) -> bool {
            lock(&self.state).conn.is_some()
        }

        fn open(&self) -> redis::RedisResult<redis::Connection> {
            let conn = self.client.get_connection_with_timeout(IO_TIMEOUT)?;
            conn.set_read_timeout(Some(IO_TIMEOUT))?;
            conn.set_write_timeout(Some(IO_TIMEOUT))?;
            Ok(conn)
        }

        /// Connects if not connected and not waiting out a backoff; returns whether a
        /// connection is available.
        fn ensure_connected(&self, state: &mut State) -> bool {
            if state.conn.is_some() {
                return true;
            }
            let now = Instant::now();
            if state.next_attempt.is_some_and(|t| now < t) {
                return false;
            }
            match self.open() {
                Ok(conn) => {
                    state.conn = Some(conn);
                    state.next_attempt = None;
                    state.backoff = self.reconnect_min;
                    if let Some(since) = state.outage_since.take() {
                        tracing::info!(
                            url = %self.display_url,
                            down_for = ?since.elapsed(),
                            "Redis result cache reachable again"
                        );
                    }
                    true
                }
                Err(e) => {
                    self.outage(state, &e);
                    false
                }
            }
        }

        fn outage(&self, state: &mut State, error: &redis::RedisError) {
            state.conn = None;
            if state.outage_since.is_none() {
                state.outage_since = Some(Instant::now());
                state.backoff = self.reconnect_min;
                tracing::warn!(
                    url = %self.display_url,
                    %error,
                    "Redis result cache unreachable: serving misses until it is back"
                );
            } else {
                tracing::debug!(%error, "Redis result cache still unreachable");
            }
            state.next_attempt = Some(Instant::now() + state.backoff);
            state.backoff = (state.backoff * 2).min(RECONNECT_MAX);
        }

        /// Runs one command; `None` on any failure.
        fn run<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Option<T> {
            let mut state = lock(&self.state);
            if !self.ensure_connected(&mut state) {
                return None;
            }
            let conn = state.conn.as_mut()?;
            match cmd.query::<T>(conn) {
                Ok(value) => Some(value),
                // A timed-out reply may still arrive and would be read as the answer to
                // the next command: drop the connection on any transport error.
                Err(e) if e.is_io_error() || e.is_unrecoverable_error() || e.is_timeout() => {
                    self.outage(&mut state, &e);
                    None
                }
                Err(e) => {
                    tracing::warn!(error = %e, "Redis result cache command failed");
                    None
                }
            }
        }

        fn full_key(&self, key: &str) -> String {
            format!("{}{key}", self.key_prefix)
        }
    }

    impl ResultCache for RedisResultCache {
        fn get(&self, key: &str) -> Option<String> {
            let mut cmd = redis::cmd("GET");
            cmd.arg(self.full_key(key));
            self.run::<Option<String>>(&cmd).flatten()
        }

        fn put(&self, key: &str, value: &str) {
            if self.ttl.is_zero() {
                return;
            }
            let mut cmd = redis::cmd("SET");
            cmd.arg(self.full_key(key)).arg(value);
            // EX takes whole seconds; a fractional TTL goes in milliseconds instead.
            if let Some((unit, amount)) = expiry_args(self.ttl) {
                cmd.arg(unit).arg(amount);
            }
            let _: Option<()> = self.run(&cmd);
        }
    }

    #[cfg(test)]
    mod tests {
        use super::super::DEFAULT_TTL;
        use super::*;
        use std::net::{TcpListener, TcpStream};
        use std::process::{Child, Command, Stdio};
        use std::sync::Arc;
        use std::sync::atomic::{AtomicUsize, Ordering};

        /// A throwaway `redis-server` on a free loopback port, killed on drop.
        struct RedisServer {
            child: Child,
            port: u16,
        }

        impl RedisServer {
            /// `None` (with a note) when `redis-server` is not installed, unless
            /// `MOERA_REQUIRE_REDIS=1`.
            fn start(extra: &[&str]) -> Option<Self> {
                let port = free_port();
                Self::start_on(port, extra)
            }

            fn start_on(port: u16, extra: &[&str]) -> Option<Self> {
                let spawned = Command::new("redis-server")
                    .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                    .args(["--save", "", "--appendonly", "no"])
                    .arg("--dir")
                    .arg(std::env::temp_dir())
                    .args(extra)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn();
                let child = match spawned {
                    Ok(child) => child,
                    Err(e) if std::env::var("MOERA_REQUIRE_REDIS").as_deref() == Ok("1") => {
                        panic!("MOERA_REQUIRE_REDIS=1 but redis-server cannot start: {e}")
                    }
                    Err(e) => {
                        eprintln!("note: skipping a Redis test: cannot start redis-server ({e})");
                        return None;
                    }
                };
                let server = Self { child, port };
                let deadline = Instant::now() + Duration::from_secs(10);
                while TcpStream::connect(("127.0.0.1", port)).is_err() {
                    assert!(Instant::now() < deadline, "redis-server did not start");
                    std::thread::sleep(Duration::from_millis(20));
                }
                Some(server)
            }

            fn url(&self) -> String {
                format!("redis://127.0.0.1:{}/", self.port)
            }

            fn kill(&mut self) {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }

        impl Drop for RedisServer {
            fn drop(&mut self) {
                self.kill();
            }
        }

        fn free_port() -> u16 {
            TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map(|a| a.port())
                .expect("no free loopback port")
        }

        #[test]
        fn hit_and_miss() {
            let Some(server) = RedisServer::start(&[]) else {
                return;
            };
            let cache = RedisResultCache::connect(&server.url(), DEFAULT_TTL, "test:").unwrap();
            assert!(cache.is_connected());
            assert_eq!(cache.get("absent"), None);
            cache.put("k", "value with ünïcode");
            assert_eq!(cache.get("k").as_deref(), Some("value with ünïcode"));
            cache.put("k", "replaced");
            assert_eq!(cache.get("k").as_deref(), Some("replaced"));
            // The prefix separates caches on one server.
            let other = RedisResultCache::connect(&server.url(), DEFAULT_TTL, "other:").unwrap();
            assert_eq!(other.get("k"), None);
        }

        #[test]
        fn entries_expire_after_the_ttl() {
            let Some(server) = RedisServer::start(&[]) else {
                return;
            };
            let cache =
                RedisResultCache::connect(&server.url(), Duration::from_secs(1), "ttl:").unwrap();
            cache.put("k", "v");
            assert_eq!(cache.get("k").as_deref(), Some("v"));
            std::thread::sleep(Duration::from_millis(1200));
            assert_eq!(cache.get("k"), None);
        }

        #[test]
        fn fractional_ttl_uses_milliseconds() {
            let Some(server) = RedisServer::start(&[]) else {
                return;
            };
            let cache = RedisResultCache::connect(&server.url(), Duration::from_millis(300), "ms:")
                .unwrap();
            cache.put("k", "v");
            assert_eq!(cache.get("k").as_deref(), Some("v"));
            std::thread::sleep(Duration::from_millis(450));
            assert_eq!(cache.get("k"), None);
        }

        #[test]
        fn least_recently_used_entries_are_evicted_at_maxmemory() {
            let Some(server) = RedisServer::start(&[
                "--maxmemory",
                "2mb",
                "--maxmemory-policy",
                "allkeys-lru",
                "--maxmemory-samples",
                "10",
            ]) else {
                return;
            };
            let cache = RedisResultCache::connect(&server.url(), DEFAULT_TTL, "lru:").unwrap();
            const BATCHES: usize = 4;
            const PER_BATCH: usize = 32;
            let value = "x".repeat(64 * 1024);
            // 4 × 2 MiB. Redis tracks recency in whole seconds, so the batches are written a
            // second apart: then every batch is strictly older than the next.
            for batch in 0..BATCHES {
                if batch > 0 {
                    std::thread::sleep(Duration::from_millis(1100));
                }
                for i in 0..PER_BATCH {
                    cache.put(&format!("{batch}-{i}"), &value);
                }
            }
            let present = |batch: usize| {
                (0..PER_BATCH)
                    .filter(|i| cache.get(&format!("{batch}-{i}")).is_some())
                    .count()
            };
            let (first, last) = (present(0), present(BATCHES - 1));
            assert_eq!(first, 0, "the oldest entries should be evicted");
            assert!(last > 0, "the newest entries should remain");
            assert!(
                last < PER_BATCH,
                "2 MiB of values cannot fit under maxmemory 2mb"
            );
        }

        /// Counts `WARN` events (tracing-subscriber is not a dependency of the engine).
        struct WarnCounter(Arc<AtomicUsize>);

        impl tracing::Subscriber for WarnCounter {
            fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
                true
            }
            fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
                tracing::span::Id::from_u64(1)
            }
            fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
            fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
            fn event(&self, event: &tracing::Event<'_>) {
                if *event.metadata().level() == tracing::Level::WARN {
                    self.0.fetch_add(1, Ordering::SeqCst);
                }
            }
            fn enter(&self, _: &tracing::span::Id) {}
            fn exit(&self, _: &tracing::span::Id) {}
        }

        #[test]
        fn unreachable_server_degrades_to_misses() {
            let warnings = Arc::new(AtomicUsize::new(0));
            let subscriber = WarnCounter(Arc::clone(&warnings));
            tracing::subscriber::with_default(subscriber, || {
                let port = free_port();
                let started = Instant::now();
                let cache = RedisResultCache::connect(
                    &format!("redis://:secret-password@127.0.0.1:{port}/"),
                    DEFAULT_TTL,
                    "down:",
                )
                .unwrap();
                assert!(!cache.is_connected());
                assert!(!format!("{cache:?}").contains("secret-password"));
                for _ in 0..20 {
                    assert_eq!(cache.get("k"), None);
                    cache.put("k", "v");
                }
                assert!(started.elapsed() < Duration::from_secs(3));
            });
            assert_eq!(warnings.load(Ordering::SeqCst), 1, "one warning per outage");
        }

        #[test]
        fn server_dying_mid_use_degrades_to_misses_then_recovers() {
            let Some(mut server) = RedisServer::start(&[]) else {
                return;
            };
            let port = server.port;
            let mut cache = RedisResultCache::connect(&server.url(), DEFAULT_TTL, "dies:").unwrap();
            cache.reconnect_min = Duration::from_millis(100);
            cache.put("k", "v");
            assert_eq!(cache.get("k").as_deref(), Some("v"));

            server.kill();
            let started = Instant::now();
            for _ in 0..20 {
                assert_eq!(cache.get("k"), None);
                cache.put("k2", "v2");
            }
            assert!(started.elapsed() < Duration::from_secs(3));
            assert!(!cache.is_connected());

            // Back on the same port (empty, since nothing is persisted): writes land again.
            let Some(_server) = RedisServer::start_on(port, &[]) else {
                return;
            };
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                cache.put("k3", "v3");
                if cache.get("k3").as_deref() == Some("v3") {
                    break;
                }
                assert!(Instant::now() < deadline, "the cache did not reconnect");
                std::thread::sleep(Duration::from_millis(50));
            }
            assert!(cache.is_connected());
        }

        #[test]
        fn malformed_url_is_an_error_without_the_password() {
            let err = RedisResultCache::connect("http://:pw@host/", DEFAULT_TTL, "")
                .unwrap_err()
                .to_string();
            assert!(!err.contains("pw@"), "{err}");
        }

        #[test]
        fn redacts_passwords() {
            assert_eq!(
                redact_url("redis://user:pa@ss@host:6379/0"),
                "redis://***@host:6379/0"
            );
            assert_eq!(redact_url("redis://host/"), "redis://host/");
            for (url, redacted) in [
                (
                    "redis+unix:///tmp/redis.sock?db=0&pass=secret",
                    "redis+unix:///tmp/redis.sock?db=0&pass=***",
                ),
                (
                    "unix:///tmp/redis.sock?pass=secret&db=0",
                    "unix:///tmp/redis.sock?pass=***&db=0",
                ),
                (
                    "redis://host:6379/0?password=secret",
                    "redis://host:6379/0?password=***",
                ),
                ("redis://host/?PASS=secret", "redis://host/?PASS=***"),
                ("redis://host/?p%61ss=secret", "redis://host/?p%61ss=***"),
                (
                    "redis://host/?pass=se@cret&db=1",
                    "redis://host/?pass=***&db=1",
                ),
                ("redis://user:secret@host", "redis://***@host"),
                (
                    "rediss://:secret@host:6380/?protocol=resp3",
                    "rediss://***@host:6380/?protocol=resp3",
                ),
                (
                    "redis://:sec?ret@host/?pass=secret",
                    "redis://***@host/?pass=***",
                ),
                (
                    "redis+unix:///tmp/redis.sock?pass=secret?db=0",
                    "redis+unix:///tmp/redis.sock?pass=***?db=0",
                ),
                ("redis://host/?db=1&pass", "redis://host/?db=1&pass"),
                ("redis://host/?passport=x", "redis://host/?passport=x"),
            ] {
                assert_eq!(redact_url(url), redacted, "{url}");
            }
        }

        #[test]
        fn expiry_arguments() {
            assert_eq!(expiry_args(DEFAULT_TTL), Some(("EX", 3600)));
            assert_eq!(expiry_args(Duration::from_millis(1500)), Some(("PX", 1500)));
            assert_eq!(expiry_args(Duration::from_micros(10)), Some(("PX", 1)));
            // Too long for Redis: no expiry rather than a refused command or a truncated one.
            assert_eq!(expiry_args(Duration::from_secs_f64(1e19)), None);
            assert_eq!(expiry_args(Duration::MAX), None);
            assert_eq!(
                expiry_args(Duration::from_secs_f64(1e12 + 0.5)),
                None,
                "{:?}",
                Duration::from_secs_f64(1e12 + 0.5)
            );
        }

        #[test]
        fn huge_ttl_is_stored_without_expiry() {
            let Some(server) = RedisServer::start(&[]) else {
                return;
            };
            let cache = RedisResultCache::connect(
                &server.url(),
                Duration::from_secs_f64(1e19 + 0.5),
                "huge:",
            )
            .unwrap();
            cache.put("k", "v");
            assert_eq!(cache.get("k").as_deref(), Some("v"));
        }

        use crate::rag::captured_logs::Logged;

        #[test]
        fn secrets_stay_out_of_debug_errors_and_logs() {
            let port = free_port();
            let socket = std::env::temp_dir()
                .join(format!("moera-no-such-redis-{}.sock", std::process::id()));
            let socket = socket.display();
            // Well-formed but unreachable: `connect` succeeds and logs the outage.
            let unreachable = [
                format!("redis+unix://{socket}?db=0&pass=s3cr3t-pw"),
                format!("unix://{socket}?pass=s3cr3t-pw&db=0"),
                format!("redis+unix://{socket}?PASSWORD=s3cr3t-pw"),
                format!("redis://user:s3cr3t-pw@127.0.0.1:{port}/0"),
                format!("redis://:s3cr3t@pw@127.0.0.1:{port}/"),
            ];
            // Malformed: `connect` fails.
            let malformed = [
                format!("redis+unix://{socket}?db=zero&pass=s3cr3t-pw"),
                format!("redis://:s3cr3t-pw@127.0.0.1:{port}/not-a-db"),
                "redis://:s3cr3t-pw@127.0.0.1:99999/".to_owned(),
                format!("redis://127.0.0.1:{port}/?protocol=9&pass=s3cr3t-pw"),
                "http://:s3cr3t-pw@host/".to_owned(),
            ];
            let logged = Logged::default();
            tracing::subscriber::with_default(logged.clone(), || {
                for url in &unreachable {
                    let cache = RedisResultCache::connect(url, DEFAULT_TTL, "x:")
                        .unwrap_or_else(|e| panic!("{e}"));
                    assert!(!cache.is_connected(), "{url}");
                    for text in [format!("{cache:?}"), format!("{cache:#?}")] {
                        assert!(!text.contains("s3cr3t"), "{text}");
                        assert!(text.contains("***"), "{text}");
                    }
                    assert_eq!(cache.get("k"), None);
                }
                for url in &malformed {
                    let err = RedisResultCache::connect(url, DEFAULT_TTL, "x:").unwrap_err();
                    for text in [err.to_string(), format!("{err:?}")] {
                        assert!(!text.contains("s3cr3t"), "{url}: {text}");
                    }
                }
            });
            let logged = logged.events();
            assert!(
                logged.iter().filter(|e| e.starts_with("WARN")).count() >= unreachable.len(),
                "{logged:?}"
            );
            for event in logged.iter() {
                assert!(!event.contains("s3cr3t"), "{event}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rag::breaker::ManualClock;

    fn key(prompt: &str) -> InferenceKey {
        InferenceKey::new(
            "smollm2",
            None,
            prompt,
            SamplingParams::greedy(),
            32,
            vec![],
        )
    }

    #[test]
    fn lru_keeps_links_consistent_under_churn() {
        // Compare against a naive model: a Vec ordered from least to most recent.
        let mut lru: Lru<u32, u32> = Lru::new(5);
        let mut model: Vec<(u32, u32)> = Vec::new();
        let mut x: u32 = 12345;
        for step in 0..5000 {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            let k = (x >> 16) % 9;
            match (x >> 8) % 3 {
                0 => {
                    let got = lru.get(&k).copied();
                    let pos = model.iter().position(|(mk, _)| *mk == k);
                    let want = pos.map(|p| {
                        let e = model.remove(p);
                        model.push(e);
                        e.1
                    });
                    assert_eq!(got, want, "step {step}");
                }
                1 => {
                    lru.insert(Arc::new(k), step);
                    if let Some(p) = model.iter().position(|(mk, _)| *mk == k) {
                        model.remove(p);
                    } else if model.len() == 5 {
                        model.remove(0);
                    }
                    model.push((k, step));
                }
                _ => {
                    let got = lru.remove(&k);
                    let want = model
                        .iter()
                        .position(|(mk, _)| *mk == k)
                        .map(|p| model.remove(p).1);
                    assert_eq!(got, want, "step {step}");
                }
            }
            assert_eq!(lru.len(), model.len());
            // Walk the list from the least recent end.
            let mut walked = Vec::new();
            let mut i = lru.tail;
            while i != NIL {
                walked.push((*lru.nodes[i].key, lru.nodes[i].value));
                i = lru.nodes[i].prev;
            }
            assert_eq!(walked, model, "step {step}");
        }
    }

    #[test]
    fn inference_hit_and_miss() {
        let cache = InferenceCache::new(4);
        assert_eq!(cache.get(&key("a")), None);
        assert!(cache.put(key("a"), "A".to_string()));
        assert_eq!(cache.get(&key("a")).as_deref(), Some("A"));
        assert_eq!(cache.get(&key("b")), None);
        let stats = cache.stats();
        assert_eq!((stats.hits, stats.misses, stats.entries), (1, 2, 1));
    }

    #[test]
    fn inference_key_covers_every_field() {
        let cache = InferenceCache::new(16);
        let base = key("p");
        cache.put(base.clone(), 0);
        let mut variants = Vec::new();
        let mut k = base.clone();
        k.model = "other".into();
        variants.push(k);
        let mut k = base.clone();
        k.adapter = Some("sql".into());
        variants.push(k);
        let mut k = base.clone();
        k.max_tokens = 33;
        variants.push(k);
        let mut k = base.clone();
        k.stop = vec!["\n".into()];
        variants.push(k);
        let mut k = base.clone();
        k.sampling.repetition_penalty = 1.1;
        variants.push(k);
        let mut k = base.clone();
        k.sampling.temperature = 0.7;
        k.sampling.seed = Some(1);
        variants.push(k);
        for v in &variants {
            assert_eq!(cache.get(v), None, "{v:?}");
        }
        // Sampled with a seed: the seed and truncation parameters matter.
        let mut seeded = base.clone();
        seeded.sampling.temperature = 0.7;
        seeded.sampling.seed = Some(1);
        cache.put(seeded.clone(), 1);
        let mut other_seed = seeded.clone();
        other_seed.sampling.seed = Some(2);
        assert_eq!(cache.get(&other_seed), None);
        let mut other_top_p = seeded.clone();
        other_top_p.sampling.top_p = 0.9;
        assert_eq!(cache.get(&other_top_p), None);
        assert_eq!(cache.get(&seeded), Some(1));
    }

    #[test]
    fn greedy_keys_ignore_parameters_that_cannot_change_an_argmax() {
        let cache = InferenceCache::new(4);
        cache.put(key("p"), "greedy".to_string());
        let mut k = key("p");
        k.sampling.seed = Some(7);
        k.sampling.top_k = 40;
        k.sampling.top_p = 0.9;
        k.sampling.temperature = -0.0;
        assert_eq!(cache.get(&k).as_deref(), Some("greedy"));
    }

    #[test]
    fn least_recently_used_is_evicted() {
        let cache = InferenceCache::new(2);
        cache.put(key("a"), 1);
        cache.put(key("b"), 2);
        // Reading `a` makes `b` the least recently used.
        assert_eq!(cache.get(&key("a")), Some(1));
        cache.put(key("c"), 3);
        assert_eq!(cache.get(&key("b")), None);
        assert_eq!(cache.get(&key("a")), Some(1));
        assert_eq!(cache.get(&key("c")), Some(3));
        assert_eq!(cache.len(), 2);
        assert_eq!(cache.stats().evictions, 1);
        // Replacing a value refreshes it too and evicts nothing.
        cache.put(key("c"), 30);
        cache.put(key("a"), 10);
        cache.put(key("d"), 4);
        assert_eq!(cache.get(&key("c")), None);
        assert_eq!(cache.get(&key("a")), Some(10));
    }

    #[test]
    fn non_deterministic_requests_are_not_cached() {
        let cache = InferenceCache::new(4);
        let mut k = key("p");
        k.sampling.temperature = 0.8;
        assert!(!k.is_deterministic());
        assert!(!cache.put(k.clone(), "random".to_string()));
        assert_eq!(cache.get(&k), None);
        assert!(cache.is_empty());
        let stats = cache.stats();
        assert_eq!((stats.bypassed, stats.misses, stats.hits), (2, 0, 0));
        k.sampling.seed = Some(3);
        assert!(k.is_deterministic());
        assert!(cache.put(k.clone(), "seeded".to_string()));
        assert_eq!(cache.get(&k).as_deref(), Some("seeded"));
    }

    #[test]
    fn capacity_zero_stores_nothing() {
        let cache = InferenceCache::new(0);
        assert!(!cache.put(key("a"), 1));
        assert_eq!(cache.get(&key("a")), None);
        assert_eq!(cache.len(), 0);
        let memory = MemoryResultCache::new(0, DEFAULT_TTL);
        memory.put("k", "v");
        assert_eq!(memory.get("k"), None);
    }

    #[test]
    fn inference_cache_is_shareable_across_threads() {
        fn check<T: Send + Sync>() {}
        check::<InferenceCache<String>>();
        check::<MemoryResultCache>();
        let cache = Arc::new(InferenceCache::new(64));
        std::thread::scope(|s| {
            for t in 0..4 {
                let cache = Arc::clone(&cache);
                s.spawn(move || {
                    for i in 0..100 {
                        let k = key(&format!("{t}-{}", i % 20));
                        if cache.get(&k).is_none() {
                            cache.put(k, i);
                        }
                    }
                });
            }
        });
        assert!(cache.len() <= 64);
        let stats = cache.stats();
        assert_eq!(stats.hits + stats.misses, 400);
    }

    #[test]
    fn result_cache_keys_are_unambiguous() {
        let k = result_cache_key(&["ab", "c"]);
        assert_eq!(k.len(), 64);
        assert!(k.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(k, result_cache_key(&["ab", "c"]));
        assert_ne!(k, result_cache_key(&["a", "bc"]));
        assert_ne!(k, result_cache_key(&["abc"]));
        assert_ne!(result_cache_key(&[""]), result_cache_key(&[]));
        assert_ne!(result_cache_key(&["", ""]), result_cache_key(&[""]));
    }

    #[test]
    fn memory_hit_and_miss() {
        let cache = MemoryResultCache::new(8, DEFAULT_TTL);
        assert_eq!(cache.get("k"), None);
        cache.put("k", "v");
        assert_eq!(cache.get("k").as_deref(), Some("v"));
        cache.put("k", "v2");
        assert_eq!(cache.get("k").as_deref(), Some("v2"));
        let stats = cache.stats();
        assert_eq!((stats.hits, stats.misses, stats.entries), (2, 1, 1));
    }

    #[test]
    fn memory_entries_expire_after_the_ttl() {
        let clock = ManualClock::new();
        let cache = MemoryResultCache::new(8, Duration::from_secs(60)).with_clock(clock.clone());
        cache.put("old", "1");
        clock.advance(Duration::from_secs(30));
        cache.put("new", "2");
        clock.advance(Duration::from_secs(29));
        assert_eq!(cache.get("old").as_deref(), Some("1"));
        clock.advance(Duration::from_secs(1));
        // Reading does not extend the life of an entry.
        assert_eq!(cache.get("old"), None);
        assert_eq!(cache.get("new").as_deref(), Some("2"));
        assert_eq!(cache.len(), 1, "an expired entry is dropped when read");
        clock.advance(Duration::from_secs(30));
        assert_eq!(cache.get("new"), None);
        // Writing again restarts the clock.
        cache.put("new", "3");
        clock.advance(Duration::from_secs(59));
        assert_eq!(cache.get("new").as_deref(), Some("3"));
        assert_eq!(cache.stats().expirations, 2);
    }

    #[test]
    fn memory_evicts_the_least_recently_used() {
        let cache = MemoryResultCache::new(3, DEFAULT_TTL);
        for k in ["a", "b", "c"] {
            cache.put(k, k);
        }
        assert!(cache.get("a").is_some());
        cache.put("d", "d");
        assert_eq!(cache.get("b"), None);
        for k in ["a", "c", "d"] {
            assert_eq!(cache.get(k).as_deref(), Some(k));
        }
        assert_eq!(cache.stats().evictions, 1);
    }

    #[test]
    fn huge_ttl_never_expires_and_does_not_panic() {
        // 1e19 s is what `MOERA_CACHE_TTL=1e19` gives: far past what an `Instant` can hold.
        for ttl in [Duration::from_secs_f64(1e19), Duration::MAX] {
            let clock = ManualClock::new();
            let cache = MemoryResultCache::new(8, ttl).with_clock(clock.clone());
            cache.put("k", "v");
            clock.advance(Duration::from_secs(100 * 365 * 24 * 3600));
            assert_eq!(cache.get("k").as_deref(), Some("v"));
            assert_eq!(cache.stats().expirations, 0);
        }
    }

    #[test]
    fn zero_ttl_stores_nothing() {
        let cache = MemoryResultCache::new(8, Duration::ZERO);
        cache.put("k", "v");
        assert_eq!(cache.get("k"), None);
    }

    #[test]
    fn result_cache_is_object_safe() {
        let cache: Arc<dyn ResultCache> = Arc::new(MemoryResultCache::new(2, DEFAULT_TTL));
        cache.put("k", "v");
        assert_eq!(cache.get("k").as_deref(), Some("v"));
    }
}
