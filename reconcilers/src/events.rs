//! Events about the operator's objects (events.k8s.io/v1), recorded the way client-go's events
//! recorder does it: a repeat of the same event within [`SERIES_WINDOW`] bumps the series of the
//! Event already written instead of writing another, and a series whose Event is gone (expired,
//! or deleted with `kubectl delete events`) starts again as a new Event instead of failing.
//!
//! kube-runtime's `Recorder` patches its cached Event blindly: once that Event is deleted, every
//! repeat fails with 404 until its cache entry expires, so the repeats are lost; and it sends the
//! note as given, which the API server refuses past 1024 bytes.

use std::num::NonZeroUsize;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::{Event, EventSeries};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::Client;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::events::EventType;

/// The longest note events.k8s.io accepts, in bytes.
pub const MAX_NOTE_BYTES: usize = 1024;

/// How long after its last repeat an event still joins the same series (client-go's events
/// recorder keeps a series for 6 minutes).
pub const SERIES_WINDOW: Duration = Duration::from_secs(6 * 60);

/// Series remembered at once; the least recently repeated are forgotten first (a forgotten one
/// starts a new Event on its next repeat).
const SERIES_LIMIT: NonZeroUsize = match NonZeroUsize::new(4096) {
    Some(limit) => limit,
    None => NonZeroUsize::MIN,
};

/// What makes two events the same one repeated: who reports it, about what, and why (not the
/// note, which may carry a count or a detail that changes on every repeat).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct SeriesKey {
    regarding: (Option<String>, Option<String>, Option<String>, Option<String>),
    type_: &'static str,
    reason: String,
    action: String,
}

/// The Event a series was written to.
#[derive(Clone, Debug)]
struct Written {
    namespace: String,
    name: String,
    count: i32,
    last: Instant,
}

/// Records events for one reporting controller and instance.
pub struct EventRecorder {
    client: Client,
    controller: String,
    instance: String,
    series: std::sync::Mutex<lru::LruCache<SeriesKey, Written>>,
}

/// `note` cut to at most [`MAX_NOTE_BYTES`] on a character boundary, ending in `...` when cut.
pub fn truncate_note(note: &str) -> String {
    if note.len() <= MAX_NOTE_BYTES {
        return note.to_owned();
    }
    let mut end = MAX_NOTE_BYTES - 3;
    while !note.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &note[..end])
}

impl EventRecorder {
    /// A recorder reporting as `controller` (the field `reportingController`) from `instance`
    /// (`reportingInstance`, the Pod's name).
    pub fn new(client: Client, controller: &str, instance: Option<String>) -> Self {
        Self {
            client,
            controller: controller.to_owned(),
            instance: instance.unwrap_or_else(|| controller.to_owned()),
            series: std::sync::Mutex::new(lru::LruCache::new(SERIES_LIMIT)),
        }
    }

    fn series(&self) -> std::sync::MutexGuard<'_, lru::LruCache<SeriesKey, Written>> {
        self.series.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Records an event about `regarding`: a new Event, or one more repeat of the series it
    /// belongs to. Errors are the API server's (a 404 of a vanished series is not one).
    pub async fn publish(
        &self,
        regarding: &ObjectReference,
        type_: EventType,
        reason: &str,
        action: &str,
        note: &str,
    ) -> Result<(), kube::Error> {
        let type_ = match type_ {
            EventType::Normal => "Normal",
            EventType::Warning => "Warning",
        };
        let key = SeriesKey {
            regarding: (
                regarding.api_version.clone(),
                regarding.kind.clone(),
                regarding.namespace.clone(),
                regarding.name.clone(),
            ),
            type_,
            reason: reason.to_owned(),
            action: action.to_owned(),
        };
        let repeated = self.series().get(&key).filter(|written| written.last.elapsed() < SERIES_WINDOW).cloned();
        if let Some(written) = repeated {
            let count = written.count + 1;
            let series = EventSeries { count, last_observed_time: MicroTime(k8s_openapi::jiff::Timestamp::now()) };
            let api: Api<Event> = Api::namespaced(self.client.clone(), &written.namespace);
            let patch = serde_json::json!({ "series": series });
            match api.patch(&written.name, &PatchParams::default(), &Patch::Merge(&patch)).await {
                Ok(_) => {
                    self.series().put(key, Written { count, last: Instant::now(), ..written });
                    return Ok(());
                }
                // The Event expired or was deleted: the repeat starts a new one.
                Err(kube::Error::Api(status)) if status.code == 404 => {
                    self.series().pop(&key);
                }
                Err(error) => return Err(error),
            }
        }
        let now = k8s_openapi::jiff::Timestamp::now();
        let namespace = regarding.namespace.clone().unwrap_or_else(|| "default".to_owned());
        let event = Event {
            metadata: ObjectMeta {
                name: Some(format!(
                    "{}.{:x}",
                    regarding.name.as_deref().unwrap_or(&self.controller),
                    now.as_nanosecond()
                )),
                namespace: Some(namespace.clone()),
                ..ObjectMeta::default()
            },
            event_time: Some(MicroTime(now)),
            type_: Some(type_.to_owned()),
            reason: Some(reason.to_owned()),
            action: Some(action.to_owned()),
            note: Some(truncate_note(note)),
            regarding: Some(regarding.clone()),
            reporting_controller: Some(self.controller.clone()),
            reporting_instance: Some(self.instance.clone()),
            ..Event::default()
        };
        let api: Api<Event> = Api::namespaced(self.client.clone(), &namespace);
        let created = api.create(&PostParams::default(), &event).await?;
        let name = created.metadata.name.unwrap_or_default();
        self.series().put(key, Written { namespace, name, count: 1, last: Instant::now() });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[test]
    fn notes_are_cut_to_1024_bytes_on_a_character_boundary() {
        assert_eq!(truncate_note("short"), "short");
        let exact = "a".repeat(MAX_NOTE_BYTES);
        assert_eq!(truncate_note(&exact), exact);
        let long = "€".repeat(1000);
        let cut = truncate_note(&long);
        assert!(cut.len() <= MAX_NOTE_BYTES && cut.ends_with("...") && cut.starts_with("€€"), "{}", cut.len());
    }

    /// An API server that records each request's method and path, answering 404 to patches
    /// while `gone` is set, and echoing creates.
    fn api_server(log: Arc<Mutex<Vec<String>>>, gone: Arc<std::sync::atomic::AtomicBool>) -> Client {
        let service = tower::service_fn(move |request: http::Request<kube::client::Body>| {
            let (log, gone) = (log.clone(), gone.clone());
            async move {
                let method = request.method().to_string();
                log.lock().unwrap_or_else(|p| p.into_inner()).push(format!("{method} {}", request.uri().path()));
                let body = request.into_body().collect_bytes().await.map(|b| b.to_vec()).unwrap_or_default();
                let response = if method == "PATCH" && gone.load(std::sync::atomic::Ordering::SeqCst) {
                    http::Response::builder().status(404).body(
                        r#"{"kind":"Status","apiVersion":"v1","status":"Failure","reason":"NotFound","code":404}"#
                            .to_owned(),
                    )
                } else {
                    let mut event: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                    event["apiVersion"] = "events.k8s.io/v1".into();
                    event["kind"] = "Event".into();
                    if method == "PATCH" {
                        event["metadata"] = serde_json::json!({"name": "patched"});
                    }
                    http::Response::builder().status(200).body(event.to_string())
                };
                Ok::<_, std::convert::Infallible>(response.unwrap_or_default())
            }
        });
        Client::new(service, "default")
    }

    #[tokio::test]
    async fn a_repeat_joins_the_series_and_a_vanished_series_starts_a_new_event() -> Result<(), kube::Error> {
        let log = Arc::new(Mutex::new(Vec::new()));
        let gone = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let recorder = EventRecorder::new(api_server(log.clone(), gone.clone()), "example-operator", None);
        let regarding = ObjectReference {
            kind: Some("MyResource".into()),
            namespace: Some("ns".into()),
            name: Some("hello".into()),
            ..ObjectReference::default()
        };
        recorder.publish(&regarding, EventType::Normal, "ConfigMapUpdated", "Updated", "one").await?;
        recorder.publish(&regarding, EventType::Normal, "ConfigMapUpdated", "Updated", "two").await?;
        gone.store(true, std::sync::atomic::Ordering::SeqCst);
        recorder.publish(&regarding, EventType::Normal, "ConfigMapUpdated", "Updated", "three").await?;
        gone.store(false, std::sync::atomic::Ordering::SeqCst);
        recorder.publish(&regarding, EventType::Normal, "ConfigMapUpdated", "Updated", "four").await?;
        let methods: Vec<String> = log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|line| line.split(' ').next().unwrap_or_default().to_owned())
            .collect();
        assert_eq!(methods, ["POST", "PATCH", "PATCH", "POST", "PATCH"], "create, repeat, 404 then create, repeat");
        Ok(())
    }
}
