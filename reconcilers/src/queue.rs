//! The work queue between the caches and the workers, with client-go's semantics and
//! controller-runtime's priorities and metrics.
//!
//! - A key is queued at most once however many events arrive for it (de-duplication).
//! - A key is handed to one worker at a time; if it is added again while a worker holds it, it is
//!   handed out again after [`WorkQueue::done`] (a change during a reconcile is never lost).
//! - [`WorkQueue::add_after`] delays a key (requeue-after); [`WorkQueue::add_rate_limited`]
//!   delays it by its own exponential backoff, which [`WorkQueue::forget`] resets.
//! - Live events ([`Priority::Live`]) are handed out before the initial list and resyncs
//!   ([`Priority::Low`]), so a user's change is not stuck behind thousands of unchanged objects;
//!   within one priority, first ready, first out.
//! - [`WorkQueue::shut_down`] stops handing out keys; workers finish what they hold.
//!
//! The bookkeeping ([`QueueState`]) is synchronous and takes the time as an argument, so its
//! semantics are tested exactly (including a property test against a simple model); the
//! [`WorkQueue`] around it adds waiting, timers and metrics.

use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;
use std::sync::Mutex;
use std::time::Duration;

use prometheus::{Histogram, IntCounter, IntGauge};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::backoff::PerObjectBackoff;

/// Which events go first. Live changes outrank the initial list and periodic resyncs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Priority {
    /// The initial list (or a relist) and resyncs: objects nobody just changed.
    Low,
    /// A watch event: somebody changed something.
    Live,
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    priority: Priority,
    ready_at: Instant,
    seq: u64,
}

type ReadyKey = (Reverse<Priority>, Instant, u64);

/// The queue's bookkeeping, without waiting or metrics. Every key is in at most one of
/// `ready`/`waiting`; a key may also be `processing` (then it is not handed out).
#[derive(Debug)]
pub struct QueueState<K> {
    entries: HashMap<K, Entry>,
    ready: BTreeMap<ReadyKey, K>,
    waiting: BTreeMap<(Instant, u64), K>,
    processing: HashMap<K, Instant>,
    next_seq: u64,
}

impl<K> Default for QueueState<K> {
    fn default() -> Self {
        Self {
            entries: HashMap::new(),
            ready: BTreeMap::new(),
            waiting: BTreeMap::new(),
            processing: HashMap::new(),
            next_seq: 0,
        }
    }
}

/// What a change to the state means for the metrics.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changed {
    /// Keys that became ready (new in the ready set): `workqueue_adds_total`.
    pub became_ready: u64,
}

impl<K: Clone + Eq + Hash> QueueState<K> {
    /// Queues `key` to be ready at `now` (or keeps an earlier time), raising its priority to
    /// `priority` if that is higher.
    pub fn add(&mut self, key: K, priority: Priority, now: Instant) -> Changed {
        self.add_at(key, priority, now, now)
    }

    /// Queues `key` to be ready at `at`, unless it is already queued for earlier; an already
    /// queued key takes the higher of the two priorities.
    pub fn add_at(&mut self, key: K, priority: Priority, at: Instant, now: Instant) -> Changed {
        let old = self.entries.get(&key).copied();
        let entry = match old {
            Some(old) => {
                let ready_at = old.ready_at.min(at);
                let priority = old.priority.max(priority);
                if ready_at == old.ready_at && priority == old.priority {
                    return Changed::default();
                }
                let was_ready = self.unlink(old);
                (Entry { priority, ready_at, seq: old.seq }, was_ready)
            }
            None => {
                self.next_seq += 1;
                (Entry { priority, ready_at: at, seq: self.next_seq }, false)
            }
        };
        let (entry, was_ready) = entry;
        self.entries.insert(key.clone(), entry);
        if entry.ready_at <= now {
            self.ready.insert((Reverse(entry.priority), entry.ready_at, entry.seq), key);
            Changed { became_ready: u64::from(!was_ready) }
        } else {
            self.waiting.insert((entry.ready_at, entry.seq), key);
            Changed::default()
        }
    }

    /// Removes `entry` from the ready or waiting set; true if it was ready.
    fn unlink(&mut self, entry: Entry) -> bool {
        if self.ready.remove(&(Reverse(entry.priority), entry.ready_at, entry.seq)).is_some() {
            return true;
        }
        self.waiting.remove(&(entry.ready_at, entry.seq));
        false
    }

    /// Moves the keys due by `now` from waiting to ready; returns how many.
    pub fn promote(&mut self, now: Instant) -> Changed {
        let mut became_ready = 0;
        while let Some(entry) = self.waiting.first_entry() {
            let (ready_at, seq) = *entry.key();
            if ready_at > now {
                break;
            }
            let key = entry.remove();
            let priority = self.entries.get(&key).map_or(Priority::Low, |e| e.priority);
            self.ready.insert((Reverse(priority), ready_at, seq), key);
            became_ready += 1;
        }
        Changed { became_ready }
    }

    /// The next key to work on: the highest priority, then the longest ready, among the keys
    /// ready by `now` that no worker holds. The caller must hand it back with [`Self::done`].
    /// Returns the key, its priority and when it became ready. Call [`Self::promote`] first.
    pub fn pop(&mut self, now: Instant) -> Option<(K, Priority, Instant)> {
        let (ready_key, key) = self.ready.iter().find(|(_, key)| !self.processing.contains_key(*key))?;
        let (ready_key, key) = (*ready_key, key.clone());
        self.ready.remove(&ready_key);
        self.entries.remove(&key);
        self.processing.insert(key.clone(), now);
        Some((key, ready_key.0.0, ready_key.1))
    }

    /// A worker finished `key`; if it was added meanwhile, it can be handed out again. Returns
    /// when the worker took it.
    pub fn done(&mut self, key: &K) -> Option<Instant> {
        self.processing.remove(key)
    }

    /// Keys ready to be handed out or held back only because a worker holds them.
    pub fn depth(&self) -> usize {
        self.ready.len()
    }

    /// Keys waiting for their delay.
    pub fn delayed(&self) -> usize {
        self.waiting.len()
    }

    /// Whether `key` is queued (ready or waiting).
    pub fn contains(&self, key: &K) -> bool {
        self.entries.contains_key(key)
    }

    /// When the next waiting key becomes ready.
    pub fn next_ready_at(&self) -> Option<Instant> {
        self.waiting.first_key_value().map(|((at, _), _)| *at)
    }

    /// Whether a worker holds `key`.
    pub fn is_processing(&self, key: &K) -> bool {
        self.processing.contains_key(key)
    }

    /// How long the workers have held their keys: the sum and the longest.
    pub fn unfinished(&self, now: Instant) -> (Duration, Duration) {
        self.processing
            .values()
            .map(|since| now.saturating_duration_since(*since))
            .fold((Duration::ZERO, Duration::ZERO), |(sum, longest), held| (sum + held, longest.max(held)))
    }
}

/// controller-runtime's `workqueue_*` metrics of one queue (labels `name` and `controller`,
/// both the controller's name).
#[derive(Clone, Debug)]
pub struct QueueMetrics {
    pub depth: IntGauge,
    pub adds: IntCounter,
    pub queue_duration: Histogram,
    pub work_duration: Histogram,
    pub unfinished_work: prometheus::Gauge,
    pub longest_running: prometheus::Gauge,
    pub retries: IntCounter,
}

/// First retry delay after a failure; doubles per consecutive failure.
pub const RETRY_BASE: Duration = Duration::from_millis(500);
/// Longest delay between retries of one key.
pub const RETRY_CAP: Duration = Duration::from_secs(300);

#[derive(Debug)]
struct Shared<K> {
    state: QueueState<K>,
    shutting_down: bool,
}

/// A work queue for the workers of one controller (see the module documentation).
#[derive(Debug)]
pub struct WorkQueue<K> {
    shared: Mutex<Shared<K>>,
    changed: Notify,
    backoff: PerObjectBackoff<K>,
    metrics: QueueMetrics,
}

impl<K: Clone + Eq + Hash> WorkQueue<K> {
    /// An empty queue reporting into `metrics`, backing off failures from [`RETRY_BASE`] to
    /// [`RETRY_CAP`].
    pub fn new(metrics: QueueMetrics) -> Self {
        Self::with_backoff(metrics, RETRY_BASE, RETRY_CAP)
    }

    /// An empty queue with its own backoff bounds.
    pub fn with_backoff(metrics: QueueMetrics, base: Duration, cap: Duration) -> Self {
        Self {
            shared: Mutex::new(Shared { state: QueueState::default(), shutting_down: false }),
            changed: Notify::new(),
            backoff: PerObjectBackoff::new(base, cap),
            metrics,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared<K>> {
        self.shared.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn changed(&self, shared: &Shared<K>, changed: Changed) {
        self.metrics.adds.inc_by(changed.became_ready);
        self.metrics.depth.set(shared.state.depth() as i64);
        self.changed.notify_waiters();
    }

    /// Queues `key` now.
    pub fn add(&self, key: K, priority: Priority) {
        let mut shared = self.lock();
        if shared.shutting_down {
            return;
        }
        let changed = shared.state.add(key, priority, Instant::now());
        self.changed(&shared, changed);
    }

    /// Queues `key` after `delay` (a retry, as controller-runtime counts retries).
    pub fn add_after(&self, key: K, delay: Duration, priority: Priority) {
        self.metrics.retries.inc();
        let mut shared = self.lock();
        if shared.shutting_down {
            return;
        }
        let now = Instant::now();
        let changed = shared.state.add_at(key, priority, now + delay, now);
        self.changed(&shared, changed);
    }

    /// Queues `key` after its next backoff delay (one more consecutive failure); returns it.
    pub fn add_rate_limited(&self, key: K, priority: Priority) -> Duration {
        let delay = self.backoff.next_delay(key.clone());
        self.add_after(key, delay, priority);
        delay
    }

    /// Forgets `key`'s failures: its next failure retries after the base delay again.
    pub fn forget(&self, key: &K) {
        self.backoff.reset(key);
    }

    /// Consecutive failures of `key` since it was last forgotten.
    pub fn failures(&self, key: &K) -> u32 {
        self.backoff.attempts(key)
    }

    /// Waits for the next key to work on; `None` once the queue shuts down. The caller must hand
    /// the key back with [`Self::done`].
    pub async fn get(&self) -> Option<(K, Priority)> {
        loop {
            let notified = self.changed.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            let next_ready_at = {
                let mut shared = self.lock();
                if shared.shutting_down {
                    return None;
                }
                let now = Instant::now();
                let promoted = shared.state.promote(now);
                self.metrics.adds.inc_by(promoted.became_ready);
                if let Some((key, priority, ready_at)) = shared.state.pop(now) {
                    self.metrics.depth.set(shared.state.depth() as i64);
                    self.metrics.queue_duration.observe(now.saturating_duration_since(ready_at).as_secs_f64());
                    return Some((key, priority));
                }
                self.metrics.depth.set(shared.state.depth() as i64);
                shared.state.next_ready_at()
            };
            match next_ready_at {
                Some(at) => {
                    tokio::select! {
                        () = notified => {}
                        () = tokio::time::sleep_until(at) => {}
                    }
                }
                None => notified.await,
            }
        }
    }

    /// A worker finished `key`.
    pub fn done(&self, key: &K) {
        let mut shared = self.lock();
        if let Some(since) = shared.state.done(key) {
            self.metrics.work_duration.observe(since.elapsed().as_secs_f64());
        }
        self.changed(&shared, Changed::default());
        drop(shared);
        self.update_unfinished();
    }

    /// Updates `workqueue_unfinished_work_seconds` and `workqueue_longest_running_processor_seconds`
    /// (the workers call it; a ticker calls it between, as client-go does every 500 ms).
    pub fn update_unfinished(&self) {
        let (sum, longest) = self.lock().state.unfinished(Instant::now());
        self.metrics.unfinished_work.set(sum.as_secs_f64());
        self.metrics.longest_running.set(longest.as_secs_f64());
    }

    /// Stops handing out keys and accepting new ones; workers holding keys finish them.
    pub fn shut_down(&self) {
        self.lock().shutting_down = true;
        self.changed.notify_waiters();
    }

    /// Keys ready (see [`QueueState::depth`]).
    pub fn depth(&self) -> usize {
        self.lock().state.depth()
    }

    /// Whether a worker holds a key or one is queued.
    pub fn is_idle(&self) -> bool {
        let shared = self.lock();
        shared.state.entries.is_empty() && shared.state.processing.is_empty()
    }
}

#[cfg(test)]
mod tests;
