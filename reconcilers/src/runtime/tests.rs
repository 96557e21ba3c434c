use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use k8s_openapi::api::core::v1::ConfigMap;
use kube::ResourceExt;
use kube::runtime::watcher::Event;

use super::*;
use crate::metrics::Metrics;
use crate::shared_cache::TestFeed;

/// A client whose every request fails: these reconcilers never call the API.
fn offline_client() -> kube::Client {
    let service = tower::service_fn(|_request: http::Request<kube::client::Body>| async {
        Err::<http::Response<kube::client::Body>, _>(std::io::Error::other("offline"))
    });
    kube::Client::new(service, "default")
}

/// Records the names it reconciles; holds every reconcile while `hold` is set; panics once on
/// the object named `boom`.
#[derive(Default)]
struct Recording {
    seen: Mutex<Vec<String>>,
    hold: tokio::sync::RwLock<()>,
    panicked: AtomicBool,
    terms: std::sync::atomic::AtomicUsize,
}

impl Recording {
    fn seen(&self) -> Vec<String> {
        self.seen.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
    }
}

impl Reconciler for Recording {
    type Object = ConfigMap;

    fn start_term(&self) {
        self.terms.fetch_add(1, Ordering::SeqCst);
    }

    async fn reconcile(&self, object: Arc<ConfigMap>) -> Result<Requeue> {
        let name = object.name_any();
        self.seen.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).push(name.clone());
        let _held = self.hold.read().await;
        if name == "boom" && !self.panicked.swap(true, Ordering::SeqCst) {
            panic!("boom on the first try");
        }
        Ok(Requeue::OnChange)
    }
}

fn config_map(name: &str, version: &str) -> ConfigMap {
    let mut config_map = ConfigMap::default();
    config_map.metadata.name = Some(name.to_owned());
    config_map.metadata.namespace = Some("ns".to_owned());
    config_map.metadata.resource_version = Some(version.to_owned());
    config_map
}

struct Running {
    recording: Arc<Recording>,
    feed: TestFeed<ConfigMap>,
    metrics: Metrics,
    stop: CancellationToken,
    run: tokio::task::JoinHandle<()>,
}

async fn start(concurrency: u16) -> Running {
    let metrics = Metrics::new().unwrap_or_else(|error| panic!("metrics: {error}"));
    let (cache, feed) = TestFeed::new(metrics.clone());
    let recording = Arc::new(Recording::default());
    let context =
        Arc::new(ControllerContext::new("test", offline_client(), metrics.clone(), None, Duration::from_secs(5)));
    let controller = Controller::new(recording.clone(), context, &cache).owns_events(&cache);
    let stop = CancellationToken::new();
    let run = tokio::spawn(controller.run(concurrency, None, stop.clone()));
    Running { recording, feed, metrics, stop, run }
}

/// Each run is a term: the reconciler is told as it starts, before any reconcile, so what it
/// remembered of an earlier term (statuses or copies it wrote) is forgotten.
#[tokio::test]
async fn each_run_starts_a_term_before_any_reconcile() {
    let metrics = Metrics::new().unwrap_or_else(|error| panic!("metrics: {error}"));
    let (cache, _feed) = TestFeed::<ConfigMap>::new(metrics.clone());
    let recording = Arc::new(Recording::default());
    let context =
        Arc::new(ControllerContext::new("test", offline_client(), metrics.clone(), None, Duration::from_secs(5)));
    let controller = Controller::new(recording.clone(), context, &cache);
    for term in 1..=2 {
        let stop = CancellationToken::new();
        let run = controller.run(1, None, stop.clone());
        assert_eq!(recording.terms.load(Ordering::SeqCst), term);
        stop.cancel();
        run.await;
        controller.end_term().await;
    }
    assert!(recording.seen().is_empty());
}

/// Waits (up to 10 s) until `check` holds.
async fn until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_panicking_reconcile_is_counted_and_retried_and_the_controller_keeps_running() {
    let mut running = start(2).await;
    running.feed.event(Event::Init).await;
    running.feed.event(Event::InitApply(config_map("boom", "1"))).await;
    running.feed.event(Event::InitApply(config_map("fine", "1"))).await;
    running.feed.event(Event::InitDone).await;
    let recording = running.recording.clone();
    until("boom to be retried after its panic", || recording.seen().iter().filter(|n| *n == "boom").count() == 2).await;
    assert_eq!(running.metrics.reconcile_panics_total.with_label_values(&["test"]).get(), 1);
    assert_eq!(running.metrics.reconcile_total.with_label_values(&["test", "error"]).get(), 1);
    assert_eq!(running.metrics.workqueue_retries_total.with_label_values(&["test", "test"]).get(), 1);
    until("both to succeed", || running.metrics.reconcile_total.with_label_values(&["test", "success"]).get() == 2)
        .await;
    running.stop.cancel();
    assert!(running.run.await.is_ok(), "the run ends cleanly");
}

#[tokio::test]
async fn a_live_change_overtakes_the_initial_list_and_depth_counts_what_waits() {
    let mut running = start(1).await;
    let gate = running.recording.hold.write().await;
    running.feed.event(Event::Init).await;
    for index in 0..20 {
        running.feed.event(Event::InitApply(config_map(&format!("listed-{index:02}"), "1"))).await;
    }
    running.feed.event(Event::InitDone).await;
    let recording = running.recording.clone();
    until("the first reconcile to start", || recording.seen().len() == 1).await;
    let depth = running.metrics.workqueue_depth.with_label_values(&["test", "test"]);
    until("19 keys to wait behind the held one", || depth.get() == 19).await;
    running.feed.event(Event::Apply(config_map("changed", "2"))).await;
    until("the change to be queued", || depth.get() == 20).await;
    drop(gate);
    until("everything to be reconciled", || recording.seen().len() == 21).await;
    let seen = recording.seen();
    assert_eq!(seen[1], "changed", "the live change goes next: {seen:?}");
    let mut listed: Vec<String> = [&seen[..1], &seen[2..]].concat();
    listed.sort();
    assert_eq!(listed, (0..20).map(|i| format!("listed-{i:02}")).collect::<Vec<_>>(), "each listed key once");
    assert_eq!(depth.get(), 0);
    assert_eq!(running.metrics.workqueue_adds_total.with_label_values(&["test", "test"]).get(), 21);
    running.stop.cancel();
    assert!(running.run.await.is_ok());
}

#[tokio::test]
async fn a_change_during_a_reconcile_is_reconciled_again_afterwards_and_a_stop_drains() {
    let mut running = start(4).await;
    running.feed.event(Event::Init).await;
    running.feed.event(Event::InitDone).await;
    let gate = running.recording.hold.write().await;
    running.feed.event(Event::Apply(config_map("a", "1"))).await;
    let recording = running.recording.clone();
    until("a's reconcile to start", || recording.seen().len() == 1).await;
    // Two more changes while it runs: one more reconcile, after it, never at the same time.
    running.feed.event(Event::Apply(config_map("a", "2"))).await;
    running.feed.event(Event::Apply(config_map("a", "3"))).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(recording.seen().len(), 1, "no second worker takes a while it is held");
    drop(gate);
    until("a to be reconciled again", || recording.seen().len() == 2).await;
    // Stop while a reconcile is held: it finishes, nothing new starts.
    let gate = running.recording.hold.write().await;
    running.feed.event(Event::Apply(config_map("b", "1"))).await;
    until("b's reconcile to start", || recording.seen().len() == 3).await;
    running.stop.cancel();
    running.feed.event(Event::Apply(config_map("c", "1"))).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!running.run.is_finished(), "the run waits for the held reconcile");
    drop(gate);
    let finished = tokio::time::timeout(Duration::from_secs(5), running.run).await;
    assert!(matches!(finished, Ok(Ok(()))), "{finished:?}");
    assert_eq!(recording.seen(), ["a", "a", "b"]);
}
