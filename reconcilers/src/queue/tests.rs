use std::collections::HashSet;
use std::sync::Arc;

use proptest::prelude::*;

use super::*;
use crate::metrics::Metrics;

fn queue() -> (WorkQueue<&'static str>, Metrics) {
    let metrics = Metrics::new().unwrap_or_else(|error| panic!("metrics: {error}"));
    (WorkQueue::new(metrics.queue_metrics("test")), metrics)
}

/// The next key within a (paused-clock) second, or `None`.
async fn next(queue: &WorkQueue<&'static str>) -> Option<&'static str> {
    tokio::time::timeout(Duration::from_secs(1), queue.get()).await.ok().flatten().map(|(key, _)| key)
}

#[tokio::test(start_paused = true)]
async fn a_key_added_many_times_is_queued_once() {
    let (queue, metrics) = queue();
    for _ in 0..3 {
        queue.add("a", Priority::Live);
    }
    queue.add("b", Priority::Live);
    assert_eq!(queue.depth(), 2);
    assert_eq!(metrics.queue_metrics("test").adds.get(), 2, "de-duplicated adds are not counted");
    assert_eq!(metrics.queue_metrics("test").depth.get(), 2);
    assert_eq!(next(&queue).await, Some("a"));
    assert_eq!(next(&queue).await, Some("b"));
    assert_eq!(next(&queue).await, None);
}

#[tokio::test(start_paused = true)]
async fn a_key_changed_while_held_is_handed_out_again_after_done_and_never_twice_at_once() {
    let (queue, _) = queue();
    queue.add("a", Priority::Live);
    assert_eq!(next(&queue).await, Some("a"));
    queue.add("a", Priority::Live);
    assert_eq!(queue.depth(), 1, "queued again");
    assert_eq!(next(&queue).await, None, "but not while a worker holds it");
    queue.done(&"a");
    assert_eq!(next(&queue).await, Some("a"));
    queue.done(&"a");
    assert_eq!(next(&queue).await, None, "once per change");
}

#[tokio::test(start_paused = true)]
async fn a_waiting_worker_wakes_when_a_held_key_is_done() {
    let (queue, _) = queue();
    let queue = Arc::new(queue);
    queue.add("a", Priority::Live);
    assert_eq!(next(&queue).await, Some("a"));
    queue.add("a", Priority::Live);
    let waiter = tokio::spawn({
        let queue = queue.clone();
        async move { queue.get().await.map(|(key, _)| key) }
    });
    tokio::task::yield_now().await;
    queue.done(&"a");
    let woke = tokio::time::timeout(Duration::from_secs(1), waiter).await;
    assert!(matches!(woke, Ok(Ok(Some("a")))), "{woke:?}");
}

#[tokio::test(start_paused = true)]
async fn live_events_go_ahead_of_the_initial_list() {
    let (queue, _) = queue();
    for key in ["old-1", "old-2", "old-3"] {
        queue.add(key, Priority::Low);
    }
    queue.add("changed", Priority::Live);
    // An initial-list key that then changes is raised, keeping its place among live keys.
    queue.add("old-3", Priority::Live);
    let order: Vec<_> = [next(&queue).await, next(&queue).await, next(&queue).await, next(&queue).await].into();
    assert_eq!(order, [Some("old-3"), Some("changed"), Some("old-1"), Some("old-2")]);
}

#[tokio::test(start_paused = true)]
async fn delayed_adds_wait_count_as_retries_and_an_immediate_add_overrides_them() {
    let (queue, metrics) = queue();
    queue.add_after("a", Duration::from_secs(10), Priority::Low);
    assert_eq!(queue.depth(), 0);
    assert_eq!(next(&queue).await, None);
    tokio::time::advance(Duration::from_secs(10)).await;
    assert_eq!(next(&queue).await, Some("a"));
    queue.done(&"a");
    assert_eq!(metrics.queue_metrics("test").retries.get(), 1);

    queue.add_after("b", Duration::from_secs(60), Priority::Low);
    queue.add("b", Priority::Live);
    assert_eq!(next(&queue).await, Some("b"), "the change does not wait for the requeue");
    queue.done(&"b");
    assert_eq!(next(&queue).await, None, "and the requeue is consumed by it");
    // A later delay does not postpone an earlier one.
    queue.add_after("c", Duration::from_secs(5), Priority::Low);
    queue.add_after("c", Duration::from_secs(50), Priority::Low);
    tokio::time::advance(Duration::from_secs(5)).await;
    assert_eq!(next(&queue).await, Some("c"));
}

#[tokio::test(start_paused = true)]
async fn failures_back_off_exponentially_per_key_until_forgotten() {
    let (queue, _) = queue();
    let delays: Vec<Duration> = (0..4).map(|_| queue.add_rate_limited("a", Priority::Low)).collect();
    for (delay, nominal) in delays.iter().zip([500, 1000, 2000, 4000]) {
        let nominal = Duration::from_millis(nominal);
        assert!(*delay >= nominal.mul_f64(0.89) && *delay <= nominal.mul_f64(1.11), "{delay:?} vs {nominal:?}");
    }
    assert_eq!(queue.failures(&"a"), 4);
    assert_eq!(queue.failures(&"b"), 0, "keys back off independently");
    queue.forget(&"a");
    assert!(queue.add_rate_limited("a", Priority::Low) <= Duration::from_millis(550));
}

#[tokio::test(start_paused = true)]
async fn shutting_down_stops_handing_out_keys_and_held_keys_finish() {
    let (queue, _) = queue();
    queue.add("a", Priority::Live);
    queue.add("b", Priority::Live);
    assert_eq!(next(&queue).await, Some("a"));
    queue.shut_down();
    assert_eq!(queue.get().await, None);
    queue.done(&"a");
    queue.add("c", Priority::Live);
    assert_eq!(queue.get().await, None);
}

#[tokio::test(start_paused = true)]
async fn work_in_progress_is_measured_while_it_runs() {
    let (queue, metrics) = queue();
    let queue_metrics = metrics.queue_metrics("test");
    queue.add("a", Priority::Live);
    queue.add("b", Priority::Live);
    tokio::time::advance(Duration::from_secs(2)).await;
    assert_eq!(next(&queue).await, Some("a"));
    assert_eq!(queue_metrics.queue_duration.get_sample_count(), 1);
    assert!((queue_metrics.queue_duration.get_sample_sum() - 2.0).abs() < 0.01, "waited 2 s");
    tokio::time::advance(Duration::from_secs(1)).await;
    assert_eq!(next(&queue).await, Some("b"));
    tokio::time::advance(Duration::from_secs(3)).await;
    queue.update_unfinished();
    assert!((queue_metrics.unfinished_work.get() - 7.0).abs() < 0.01, "4 s + 3 s");
    assert!((queue_metrics.longest_running.get() - 4.0).abs() < 0.01);
    queue.done(&"a");
    queue.done(&"b");
    assert_eq!(queue_metrics.work_duration.get_sample_count(), 2);
    assert_eq!(queue_metrics.unfinished_work.get(), 0.0);
    assert_eq!(queue_metrics.depth.get(), 0);
}

/// One step of a random workload.
#[derive(Clone, Debug)]
enum Op {
    Add(u8, Priority),
    AddAfter(u8, u16, Priority),
    Get,
    /// Done for the n-th held key (modulo how many are held).
    Done(usize),
    Advance(u16),
}

fn op() -> impl Strategy<Value = Op> {
    let priority = prop_oneof![Just(Priority::Low), Just(Priority::Live)];
    prop_oneof![
        (0u8..6, priority.clone()).prop_map(|(k, p)| Op::Add(k, p)),
        (0u8..6, 0u16..2000, priority).prop_map(|(k, d, p)| Op::AddAfter(k, d, p)),
        Just(Op::Get),
        Just(Op::Get),
        (0usize..8).prop_map(Op::Done),
        (0u16..1500).prop_map(Op::Advance),
    ]
}

/// The specification, written as plainly as possible: at most one pending entry per key, with
/// the earliest time and highest priority asked for; the next key is the best ready one no
/// worker holds.
#[derive(Default)]
struct Model {
    pending: Vec<(u8, Priority, Instant, u64, bool)>,
    held: Vec<u8>,
    seq: u64,
    adds: u64,
}

impl Model {
    fn add_at(&mut self, key: u8, priority: Priority, at: Instant) {
        if let Some(entry) = self.pending.iter_mut().find(|e| e.0 == key) {
            entry.1 = entry.1.max(priority);
            entry.2 = entry.2.min(at);
        } else {
            self.seq += 1;
            self.pending.push((key, priority, at, self.seq, false));
        }
    }

    fn get(&mut self, now: Instant) -> Option<u8> {
        let best = self
            .pending
            .iter()
            .enumerate()
            .filter(|(_, e)| e.2 <= now && !self.held.contains(&e.0))
            .min_by_key(|(_, e)| (Reverse(e.1), e.2, e.3))
            .map(|(index, _)| index)?;
        let (key, ..) = self.pending.remove(best);
        self.held.push(key);
        Some(key)
    }

    fn count_ready(&mut self, now: Instant) -> usize {
        let mut ready = 0;
        for entry in self.pending.iter_mut().filter(|e| e.2 <= now) {
            ready += 1;
            if !entry.4 {
                entry.4 = true;
                self.adds += 1;
            }
        }
        ready
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn the_queue_behaves_like_its_model(ops in proptest::collection::vec(op(), 1..80)) {
        let mut state: QueueState<u8> = QueueState::default();
        let mut model = Model::default();
        let mut now = Instant::now();
        let mut adds = 0;
        for op in ops {
            match op {
                Op::Add(key, priority) => {
                    adds += state.add(key, priority, now).became_ready;
                    model.add_at(key, priority, now);
                }
                Op::AddAfter(key, millis, priority) => {
                    let at = now + Duration::from_millis(u64::from(millis));
                    adds += state.add_at(key, priority, at, now).became_ready;
                    model.add_at(key, priority, at);
                }
                Op::Get => {
                    adds += state.promote(now).became_ready;
                    let got = state.pop(now).map(|(key, ..)| key);
                    prop_assert_eq!(got, model.get(now), "next key");
                }
                Op::Done(n) => {
                    if !model.held.is_empty() {
                        let key = model.held.remove(n % model.held.len());
                        prop_assert!(state.done(&key).is_some(), "{} was held", key);
                    }
                }
                Op::Advance(millis) => now += Duration::from_millis(u64::from(millis)),
            }
            adds += state.promote(now).became_ready;
            prop_assert_eq!(state.depth(), model.count_ready(now), "depth");
            prop_assert_eq!(adds, model.adds, "adds");
            let held: HashSet<u8> = model.held.iter().copied().collect();
            prop_assert_eq!(held.len(), model.held.len(), "a key is never held twice");
            for key in 0..6 {
                prop_assert_eq!(state.is_processing(&key), held.contains(&key));
                prop_assert_eq!(state.contains(&key), model.pending.iter().any(|e| e.0 == key));
            }
        }
    }
}
