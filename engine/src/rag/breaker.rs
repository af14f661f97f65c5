//! A circuit breaker around generation: after `failure_threshold` consecutive failures it
//! opens and refuses calls with [`Error::ServiceUnavailable`] for `cooldown`, then lets one
//! probe call through (half-open); the probe's outcome closes it or opens it again.
//!
//! By default only failures of the backend count ([`is_backend_failure`]): an error that
//! the caller caused (an empty or oversized prompt, a bad argument) says nothing about the
//! service's health, so a few bad requests cannot open the breaker for everyone. A
//! cooldown too long to represent keeps the breaker open until the process ends.
//!
//! ```
//! use std::time::Duration;
//! use moera_engine::rag::breaker::{BreakerConfig, BreakerState, CircuitBreaker};
//! use moera_engine::Error;
//!
//! let breaker = CircuitBreaker::new(BreakerConfig {
//!     failure_threshold: 2,
//!     cooldown: Duration::from_secs(30),
//! });
//! for _ in 0..2 {
//!     let _ = breaker.call(|| {
//!         Err::<(), _>(Error::Io {
//!             path: "backend".into(),
//!             source: std::io::Error::other("down"),
//!         })
//!     });
//! }
//! assert_eq!(breaker.state(), BreakerState::Open);
//! // Refused without running the closure.
//! let refused = breaker.call(|| -> moera_engine::Result<()> { unreachable!() });
//! assert!(matches!(refused, Err(Error::ServiceUnavailable { .. })));
//! ```

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};

/// A source of the current time, injectable so that tests need not sleep.
pub trait Clock: Send + Sync {
    fn now(&self) -> Instant;
}

/// The real clock: [`Instant::now`].
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        Instant::now()
    }
}

/// A clock that only moves when told to; clones share the same time.
#[derive(Debug, Clone)]
pub struct ManualClock {
    now: Arc<Mutex<Instant>>,
}

impl ManualClock {
    /// A clock standing at the current instant.
    pub fn new() -> Self {
        Self {
            now: Arc::new(Mutex::new(Instant::now())),
        }
    }

    /// Moves the time forward by `by`.
    pub fn advance(&self, by: Duration) {
        *lock(&self.now) += by;
    }
}

impl Default for ManualClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Instant {
        *lock(&self.now)
    }
}

/// Locks a mutex, ignoring poisoning: every critical section here leaves the data consistent
/// (plain counter and state updates), so a panic elsewhere must not disable the breaker.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// When the breaker opens and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerConfig {
    /// Consecutive failures that open the breaker (0 is treated as 1).
    pub failure_threshold: u32,
    /// How long it stays open before letting a probe through.
    pub cooldown: Duration,
}

impl Default for BreakerConfig {
    /// 5 failures, 30 s cooldown.
    fn default() -> Self {
        Self {
            failure_threshold: 5,
            cooldown: Duration::from_secs(30),
        }
    }
}

/// The state of a [`CircuitBreaker`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BreakerState {
    /// Calls go through.
    Closed,
    /// Calls are refused until the cooldown ends.
    Open,
    /// The cooldown has ended: the next call is a probe, or a probe is running and other
    /// calls are refused until it finishes.
    HalfOpen,
}

impl fmt::Display for BreakerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::HalfOpen => "half-open",
        })
    }
}

/// A snapshot of a breaker's state and counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerStats {
    pub state: BreakerState,
    /// Failures since the last success.
    pub consecutive_failures: u32,
    /// Calls that ran the closure.
    pub total_calls: u64,
    /// Calls that ran and failed.
    pub total_failures: u64,
    /// Calls refused without running.
    pub rejected: u64,
    /// How many times the breaker has opened.
    pub opened_count: u64,
}

#[derive(Debug, Clone, Copy)]
enum Phase {
    Closed,
    Open {
        /// `None`: the cooldown reaches past what an [`Instant`] can represent.
        until: Option<Instant>,
    },
    /// A probe is running.
    Probing,
}

#[derive(Debug)]
struct Inner {
    phase: Phase,
    consecutive_failures: u32,
    total_calls: u64,
    total_failures: u64,
    rejected: u64,
    opened_count: u64,
}

type FailurePredicate = dyn Fn(&Error) -> bool + Send + Sync;

/// The default failure predicate: whether `error` tells of the backend failing, as opposed
/// to a request the caller got wrong or a nested breaker's refusal. Caller errors
/// ([`Error::EmptyPrompt`], [`Error::PromptTooLong`], [`Error::InvalidArgument`],
/// [`Error::Sampling`], [`Error::TokenOutOfRange`], [`Error::EmptyQuestion`],
/// [`Error::UnknownAdapter`], [`Error::Tokenize`], [`Error::NoTokenizer`],
/// [`Error::ChatTemplate`]) and [`Error::ServiceUnavailable`] do not count; everything else
/// (I/O, model and runtime errors, index errors, ...) does.
pub fn is_backend_failure(error: &Error) -> bool {
    !matches!(
        error,
        Error::EmptyPrompt
            | Error::PromptTooLong { .. }
            | Error::InvalidArgument(_)
            | Error::Sampling(_)
            | Error::TokenOutOfRange { .. }
            | Error::EmptyQuestion
            | Error::UnknownAdapter { .. }
            | Error::Tokenize(_)
            | Error::NoTokenizer
            | Error::ChatTemplate(_)
            | Error::ServiceUnavailable { .. }
    )
}

/// A thread-safe circuit breaker; see the [module docs](self).
pub struct CircuitBreaker {
    config: BreakerConfig,
    clock: Box<dyn Clock>,
    is_failure: Box<FailurePredicate>,
    inner: Mutex<Inner>,
}

impl fmt::Debug for CircuitBreaker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CircuitBreaker")
            .field("config", &self.config)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

/// How long a caller refused during a running probe should wait: the probe may close the
/// breaker at any moment, so not a whole cooldown.
const PROBE_RETRY_AFTER: Duration = Duration::from_secs(1);

impl CircuitBreaker {
    /// A closed breaker on the system clock that counts only backend failures
    /// ([`is_backend_failure`]): not the caller's errors, nor [`Error::ServiceUnavailable`]
    /// (a nested breaker's refusal is not this service failing).
    pub fn new(config: BreakerConfig) -> Self {
        Self {
            config: BreakerConfig {
                failure_threshold: config.failure_threshold.max(1),
                ..config
            },
            clock: Box::new(SystemClock),
            is_failure: Box::new(is_backend_failure),
            inner: Mutex::new(Inner {
                phase: Phase::Closed,
                consecutive_failures: 0,
                total_calls: 0,
                total_failures: 0,
                rejected: 0,
                opened_count: 0,
            }),
        }
    }

    /// Replaces the clock (tests use [`ManualClock`]).
    pub fn with_clock(mut self, clock: impl Clock + 'static) -> Self {
        self.clock = Box::new(clock);
        self
    }

    /// Decides which errors count as failures, replacing [`is_backend_failure`]. The others
    /// are neutral: they neither add to nor reset the count of consecutive failures (a
    /// rejected bad request says nothing of the backend), and a neutral probe leaves the
    /// breaker half-open for the next call to probe.
    pub fn with_failure_predicate(
        mut self,
        is_failure: impl Fn(&Error) -> bool + Send + Sync + 'static,
    ) -> Self {
        self.is_failure = Box::new(is_failure);
        self
    }

    pub fn config(&self) -> BreakerConfig {
        self.config
    }

    /// Runs `f` unless the breaker is open; records its outcome. A panic in `f` counts as a
    /// failure (and is propagated).
    pub fn call<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let probe = self.admit()?;
        let mut outcome = Outcome {
            breaker: self,
            probe,
            recorded: false,
        };
        let result = f();
        outcome.record(match &result {
            Ok(_) => Verdict::Success,
            Err(e) if (self.is_failure)(e) => Verdict::Failure,
            Err(_) => Verdict::Neutral,
        });
        result
    }

    /// The current state; an open breaker whose cooldown has ended reads as half-open.
    pub fn state(&self) -> BreakerState {
        let inner = lock(&self.inner);
        self.public_state(&inner)
    }

    pub fn stats(&self) -> BreakerStats {
        let inner = lock(&self.inner);
        BreakerStats {
            state: self.public_state(&inner),
            consecutive_failures: inner.consecutive_failures,
            total_calls: inner.total_calls,
            total_failures: inner.total_failures,
            rejected: inner.rejected,
            opened_count: inner.opened_count,
        }
    }

    fn public_state(&self, inner: &Inner) -> BreakerState {
        match inner.phase {
            Phase::Closed => BreakerState::Closed,
            Phase::Open { until } if until.is_none_or(|t| self.clock.now() < t) => {
                BreakerState::Open
            }
            Phase::Open { .. } | Phase::Probing => BreakerState::HalfOpen,
        }
    }

    /// Lets a call through (returning whether it is the probe) or refuses it.
    fn admit(&self) -> Result<bool> {
        let mut inner = lock(&self.inner);
        match inner.phase {
            Phase::Closed => {
                inner.total_calls += 1;
                Ok(false)
            }
            Phase::Open { until } => {
                let now = self.clock.now();
                match until {
                    Some(until) if now >= until => {
                        tracing::info!("circuit breaker half-open: letting one probe call through");
                        inner.phase = Phase::Probing;
                        inner.total_calls += 1;
                        Ok(true)
                    }
                    _ => {
                        inner.rejected += 1;
                        Err(Error::ServiceUnavailable {
                            retry_after: until.map_or(self.config.cooldown, |t| t - now),
                        })
                    }
                }
            }
            Phase::Probing => {
                inner.rejected += 1;
                Err(Error::ServiceUnavailable {
                    retry_after: PROBE_RETRY_AFTER.min(self.config.cooldown),
                })
            }
        }
    }

    fn record(&self, probe: bool, verdict: Verdict) {
        let mut inner = lock(&self.inner);
        match verdict {
            Verdict::Success => {
                inner.consecutive_failures = 0;
                // Only the probe decides when to leave half-open: a call admitted before
                // the breaker opened says little about the service now.
                if probe {
                    tracing::info!("circuit breaker closed: the probe call succeeded");
                    inner.phase = Phase::Closed;
                }
                return;
            }
            Verdict::Neutral => {
                if probe {
                    // The probe learnt nothing: the next call probes again.
                    inner.phase = Phase::Open {
                        until: Some(self.clock.now()),
                    };
                }
                return;
            }
            Verdict::Failure => {}
        }
        inner.consecutive_failures = inner.consecutive_failures.saturating_add(1);
        inner.total_failures += 1;
        let open = if probe {
            true
        } else {
            matches!(inner.phase, Phase::Closed)
                && inner.consecutive_failures >= self.config.failure_threshold
        };
        if open {
            // A cooldown too long for an `Instant` (e.g. 1e19 s from the settings) must
            // not panic: the breaker then stays open.
            inner.phase = Phase::Open {
                until: self.clock.now().checked_add(self.config.cooldown),
            };
            inner.opened_count += 1;
            tracing::warn!(
                consecutive_failures = inner.consecutive_failures,
                cooldown = ?self.config.cooldown,
                probe,
                "circuit breaker opened"
            );
        }
    }
}

/// What a call tells of the backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Success,
    Failure,
    /// An error that is not the backend's (see [`is_backend_failure`]).
    Neutral,
}

/// Records a failure if dropped before recording (the closure panicked), so that a panicking
/// probe cannot leave the breaker half-open forever.
struct Outcome<'a> {
    breaker: &'a CircuitBreaker,
    probe: bool,
    recorded: bool,
}

impl Outcome<'_> {
    fn record(&mut self, verdict: Verdict) {
        self.recorded = true;
        self.breaker.record(self.probe, verdict);
    }
}

impl Drop for Outcome<'_> {
    fn drop(&mut self) {
        if !self.recorded {
            self.breaker.record(self.probe, Verdict::Failure);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Barrier, mpsc};

    /// An error of the backend itself, which the default predicate counts.
    fn down() -> Error {
        Error::Io {
            path: "backend".into(),
            source: std::io::Error::other("down"),
        }
    }

    /// A generation backend that fails its first `failures` calls, then succeeds.
    struct FlakyBackend {
        failures: usize,
        calls: AtomicUsize,
    }

    impl FlakyBackend {
        fn new(failures: usize) -> Self {
            Self {
                failures,
                calls: AtomicUsize::new(0),
            }
        }

        fn generate(&self, prompt: &str) -> Result<String> {
            let n = self.calls.fetch_add(1, Ordering::SeqCst);
            if n < self.failures {
                Err(Error::Io {
                    path: format!("backend call {n}").into(),
                    source: std::io::Error::other("down"),
                })
            } else {
                Ok(format!("answer to {prompt}"))
            }
        }

        fn calls(&self) -> usize {
            self.calls.load(Ordering::SeqCst)
        }
    }

    fn breaker(threshold: u32, cooldown_s: u64) -> (CircuitBreaker, ManualClock) {
        let clock = ManualClock::new();
        let breaker = CircuitBreaker::new(BreakerConfig {
            failure_threshold: threshold,
            cooldown: Duration::from_secs(cooldown_s),
        })
        .with_clock(clock.clone());
        (breaker, clock)
    }

    fn is_unavailable<T>(r: &Result<T>) -> bool {
        matches!(r, Err(Error::ServiceUnavailable { .. }))
    }

    #[test]
    fn is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<CircuitBreaker>();
    }

    #[test]
    fn opens_after_threshold_consecutive_failures() {
        let (breaker, _clock) = breaker(3, 30);
        let backend = FlakyBackend::new(100);
        for i in 0..2 {
            assert!(breaker.call(|| backend.generate("q")).is_err());
            assert_eq!(
                breaker.state(),
                BreakerState::Closed,
                "after {} failures",
                i + 1
            );
        }
        let third = breaker.call(|| backend.generate("q"));
        // The failing call itself returns the backend's error, not a refusal.
        assert!(matches!(third, Err(Error::Io { .. })));
        assert_eq!(breaker.state(), BreakerState::Open);
        let stats = breaker.stats();
        assert_eq!(stats.consecutive_failures, 3);
        assert_eq!(stats.total_failures, 3);
        assert_eq!(stats.opened_count, 1);
        assert_eq!(stats.rejected, 0);
    }

    #[test]
    fn open_rejects_without_calling() {
        let (breaker, clock) = breaker(2, 30);
        let backend = FlakyBackend::new(100);
        for _ in 0..2 {
            let _ = breaker.call(|| backend.generate("q"));
        }
        assert_eq!(backend.calls(), 2);
        clock.advance(Duration::from_secs(10));
        for _ in 0..5 {
            match breaker.call(|| backend.generate("q")) {
                Err(Error::ServiceUnavailable { retry_after }) => {
                    assert_eq!(retry_after, Duration::from_secs(20))
                }
                other => panic!("expected a refusal, got {other:?}"),
            }
        }
        assert_eq!(
            backend.calls(),
            2,
            "an open breaker must not call the backend"
        );
        assert_eq!(breaker.stats().rejected, 5);
        assert_eq!(breaker.stats().total_calls, 2);
    }

    #[test]
    fn half_open_probe_success_closes() {
        let (breaker, clock) = breaker(2, 30);
        let backend = FlakyBackend::new(2);
        for _ in 0..2 {
            let _ = breaker.call(|| backend.generate("q"));
        }
        assert_eq!(breaker.state(), BreakerState::Open);
        clock.advance(Duration::from_secs(30));
        assert_eq!(breaker.state(), BreakerState::HalfOpen);
        let answer = breaker.call(|| backend.generate("q")).unwrap();
        assert_eq!(answer, "answer to q");
        assert_eq!(breaker.state(), BreakerState::Closed);
        assert_eq!(breaker.stats().consecutive_failures, 0);
        // Closed again: calls flow.
        assert!(breaker.call(|| backend.generate("again")).is_ok());
        assert_eq!(backend.calls(), 4);
    }

    #[test]
    fn half_open_probe_failure_reopens_with_fresh_cooldown() {
        let (breaker, clock) = breaker(2, 30);
        let backend = FlakyBackend::new(3);
        for _ in 0..2 {
            let _ = breaker.call(|| backend.generate("q"));
        }
        clock.advance(Duration::from_secs(31));
        assert!(matches!(
            breaker.call(|| backend.generate("probe")),
            Err(Error::Io { .. })
        ));
        assert_eq!(breaker.state(), BreakerState::Open);
        assert_eq!(breaker.stats().opened_count, 2);
        // The cooldown restarts from the probe's failure, not from the first opening.
        clock.advance(Duration::from_secs(29));
        match breaker.call(|| backend.generate("q")) {
            Err(Error::ServiceUnavailable { retry_after }) => {
                assert_eq!(retry_after, Duration::from_secs(1))
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
        assert_eq!(backend.calls(), 3);
        clock.advance(Duration::from_secs(1));
        assert!(breaker.call(|| backend.generate("probe 2")).is_ok());
        assert_eq!(breaker.state(), BreakerState::Closed);
    }

    #[test]
    fn success_resets_consecutive_failures() {
        let (breaker, _clock) = breaker(3, 30);
        let fail = || Err::<(), _>(down());
        for _ in 0..2 {
            let _ = breaker.call(fail);
        }
        assert_eq!(breaker.stats().consecutive_failures, 2);
        breaker.call(|| Ok(())).unwrap();
        assert_eq!(breaker.stats().consecutive_failures, 0);
        for _ in 0..2 {
            let _ = breaker.call(fail);
        }
        // 4 failures in all, but never 3 in a row.
        assert_eq!(breaker.state(), BreakerState::Closed);
        assert_eq!(breaker.stats().total_failures, 4);
        let _ = breaker.call(fail);
        assert_eq!(breaker.state(), BreakerState::Open);
    }

    #[test]
    fn concurrent_half_open_lets_one_probe_through() {
        const CALLERS: usize = 8;
        let (breaker, clock) = breaker(1, 5);
        let _ = breaker.call(|| Err::<(), _>(down()));
        clock.advance(Duration::from_secs(5));

        let calls = AtomicUsize::new(0);
        let (probe_started_tx, probe_started_rx) = mpsc::channel();
        let (release_tx, release_rx) = mpsc::channel::<()>();
        let barrier = Barrier::new(CALLERS);
        let (breaker, calls) = (&breaker, &calls);
        std::thread::scope(|s| {
            // The probe: blocks inside the backend until the others have been refused.
            let probe = s.spawn(move || {
                breaker.call(move || {
                    calls.fetch_add(1, Ordering::SeqCst);
                    probe_started_tx.send(()).unwrap();
                    release_rx.recv().unwrap();
                    Ok("probe")
                })
            });
            probe_started_rx.recv().unwrap();
            let others: Vec<_> = (0..CALLERS)
                .map(|_| {
                    s.spawn(|| {
                        barrier.wait();
                        breaker.call(|| {
                            calls.fetch_add(1, Ordering::SeqCst);
                            Ok("other")
                        })
                    })
                })
                .collect();
            for other in others {
                let result = other.join().unwrap();
                assert!(is_unavailable(&result), "got {result:?}");
            }
            assert_eq!(breaker.state(), BreakerState::HalfOpen);
            release_tx.send(()).unwrap();
            assert_eq!(probe.join().unwrap().unwrap(), "probe");
        });
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(breaker.state(), BreakerState::Closed);
        assert_eq!(breaker.stats().rejected, CALLERS as u64);
    }

    #[test]
    fn concurrent_callers_race_for_the_probe() {
        // Same as above but all callers start together: exactly one wins the probe.
        const CALLERS: usize = 16;
        let (breaker, clock) = breaker(1, 5);
        let _ = breaker.call(|| Err::<(), _>(down()));
        clock.advance(Duration::from_secs(6));
        let calls = AtomicUsize::new(0);
        let barrier = Barrier::new(CALLERS);
        let results: Vec<Result<()>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..CALLERS)
                .map(|_| {
                    s.spawn(|| {
                        barrier.wait();
                        breaker.call(|| {
                            calls.fetch_add(1, Ordering::SeqCst);
                            // Stay in the probe long enough for the others to arrive.
                            std::thread::sleep(Duration::from_millis(50));
                            Err(down())
                        })
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(
            results.iter().filter(|r| is_unavailable(r)).count(),
            CALLERS - 1
        );
        assert_eq!(breaker.state(), BreakerState::Open);
    }

    #[test]
    fn service_unavailable_errors_do_not_count() {
        let (breaker, _clock) = breaker(1, 5);
        let nested = || {
            Err::<(), _>(Error::ServiceUnavailable {
                retry_after: Duration::from_secs(1),
            })
        };
        for _ in 0..3 {
            assert!(is_unavailable(&breaker.call(nested)));
        }
        assert_eq!(breaker.state(), BreakerState::Closed);
        assert_eq!(breaker.stats().total_failures, 0);
    }

    #[test]
    fn failure_predicate_decides_what_counts() {
        let (breaker, _clock) = breaker(1, 5);
        let breaker = breaker.with_failure_predicate(|e| !matches!(e, Error::EmptyPrompt));
        let _ = breaker.call(|| Err::<(), _>(Error::EmptyPrompt));
        assert_eq!(breaker.state(), BreakerState::Closed);
        let _ = breaker.call(|| Err::<(), _>(Error::InvalidArgument("down".into())));
        assert_eq!(breaker.state(), BreakerState::Open);
    }

    #[test]
    fn panicking_probe_reopens() {
        let (breaker, clock) = breaker(1, 5);
        let _ = breaker.call(|| Err::<(), _>(down()));
        clock.advance(Duration::from_secs(5));
        let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            breaker.call(|| -> Result<()> { panic!("backend bug") })
        }));
        assert!(panicked.is_err());
        assert_eq!(breaker.state(), BreakerState::Open);
        clock.advance(Duration::from_secs(5));
        assert!(breaker.call(|| Ok(())).is_ok());
        assert_eq!(breaker.state(), BreakerState::Closed);
    }

    #[test]
    fn zero_threshold_acts_as_one() {
        let (breaker, _clock) = breaker(0, 5);
        assert_eq!(breaker.config().failure_threshold, 1);
        assert!(breaker.call(|| Ok(())).is_ok());
        let _ = breaker.call(|| Err::<(), _>(down()));
        assert_eq!(breaker.state(), BreakerState::Open);
    }

    /// Errors the caller causes: the backend may be perfectly healthy.
    fn caller_errors() -> Vec<Error> {
        vec![
            Error::EmptyPrompt,
            Error::PromptTooLong {
                prompt: 9000,
                max_new: 256,
                context: 8192,
            },
            Error::InvalidArgument("k must be at least 1".into()),
            Error::Sampling("temperature must be finite".into()),
            Error::TokenOutOfRange {
                id: 70000,
                vocab: 49152,
            },
            Error::EmptyQuestion,
            Error::UnknownAdapter {
                name: "sql".into(),
                loaded: vec![],
            },
            Error::Tokenize("bad input".into()),
            Error::NoTokenizer,
            Error::ChatTemplate("undefined variable".into()),
            Error::ServiceUnavailable {
                retry_after: Duration::from_secs(1),
            },
        ]
    }

    #[test]
    fn caller_errors_do_not_open_the_breaker() {
        let (breaker, _clock) = breaker(1, 30);
        for error in caller_errors() {
            assert!(!is_backend_failure(&error), "{error:?}");
            let shown = error.to_string();
            let result = breaker.call(move || Err::<(), _>(error));
            // The caller still gets its error, not a refusal.
            assert_eq!(result.unwrap_err().to_string(), shown);
            assert_eq!(breaker.state(), BreakerState::Closed, "after {shown}");
        }
        let stats = breaker.stats();
        assert_eq!(stats.total_failures, 0);
        assert_eq!(stats.opened_count, 0);
        assert_eq!(stats.total_calls, caller_errors().len() as u64);
        // A real backend failure still opens it.
        let _ = breaker.call(|| Err::<(), _>(down()));
        assert_eq!(breaker.state(), BreakerState::Open);
    }

    #[test]
    fn caller_errors_are_neutral() {
        let (breaker, clock) = breaker(3, 5);
        // Bad requests between backend failures do not reset the count...
        for _ in 0..2 {
            let _ = breaker.call(|| Err::<(), _>(down()));
            let _ = breaker.call(|| Err::<(), _>(Error::EmptyPrompt));
        }
        assert_eq!(breaker.stats().consecutive_failures, 2);
        let _ = breaker.call(|| Err::<(), _>(down()));
        assert_eq!(breaker.state(), BreakerState::Open);
        // ... and a probe that was a bad request neither closes nor reopens: the next call
        // probes again at once.
        clock.advance(Duration::from_secs(5));
        let _ = breaker.call(|| Err::<(), _>(Error::EmptyPrompt));
        assert_eq!(breaker.state(), BreakerState::HalfOpen);
        assert!(breaker.call(|| Ok(())).is_ok());
        assert_eq!(breaker.state(), BreakerState::Closed);
    }

    #[test]
    fn backend_errors_count_by_default() {
        let backend_errors = [
            down(),
            Error::Runtime(moera_models::ModelError::Config("bad shape".into())),
            Error::Model {
                path: "model.safetensors".into(),
                source: moera_models::ModelError::MissingTensor("lm_head".into()),
            },
            Error::Index(moera_index::StoreError::Corrupt {
                path: "collection.bin".into(),
                reason: "truncated".into(),
            }),
            Error::DeviceUnavailable("cuda".into()),
        ];
        for error in backend_errors {
            assert!(is_backend_failure(&error), "{error:?}");
            let (breaker, _clock) = breaker(1, 30);
            let _ = breaker.call(move || Err::<(), _>(error));
            assert_eq!(breaker.state(), BreakerState::Open);
        }
    }

    #[test]
    fn oversized_prompts_do_not_lock_out_everyone() {
        // The review's scenario: a few too-long prompts, then a normal request.
        let (breaker, _clock) = breaker(3, 30);
        for _ in 0..10 {
            let _ = breaker.call(|| {
                Err::<(), _>(Error::PromptTooLong {
                    prompt: 100_000,
                    max_new: 256,
                    context: 8192,
                })
            });
        }
        assert_eq!(breaker.call(|| Ok("answer")).unwrap(), "answer");
        assert_eq!(breaker.stats().rejected, 0);
    }

    #[test]
    fn huge_cooldown_does_not_panic_and_stays_open() {
        for cooldown in [Duration::MAX, Duration::from_secs_f64(1e19)] {
            let clock = ManualClock::new();
            let breaker = CircuitBreaker::new(BreakerConfig {
                failure_threshold: 1,
                cooldown,
            })
            .with_clock(clock.clone());
            let _ = breaker.call(|| Err::<(), _>(down()));
            assert_eq!(breaker.state(), BreakerState::Open);
            clock.advance(Duration::from_secs(100 * 365 * 24 * 3600));
            assert_eq!(breaker.state(), BreakerState::Open);
            match breaker.call(|| Ok(())) {
                Err(Error::ServiceUnavailable { retry_after }) => {
                    assert_eq!(retry_after, cooldown)
                }
                other => panic!("expected a refusal, got {other:?}"),
            }
            assert_eq!(breaker.stats().total_calls, 1);
        }
    }
}
