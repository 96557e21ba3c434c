//! The MyResource controller: keeps the ConfigMap `<name>-configmap` holding `spec.message`,
//! owned by the MyResource (so the garbage collector removes it with its owner), and a status
//! that tells the truth. It never overwrites a ConfigMap it does not own.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crd_types::{ConditionStatus, MyResource, MyResourceStatus, Phase};
use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::runtime::events::EventType;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Resource, ResourceExt};

use crate::conditions::{Reason, now, ready_condition};
use crate::controller_context::{ControllerContext, Requeue};
use crate::error::{Error, Result};
use crate::owned_config_map::{self, DesiredConfigMap, WriteOutcome, controller_of_kind};
use crate::queue::Priority;
use crate::registry::{Built, CacheSet, ControllerEnv, Registration};
use crate::runtime::{Controller, Reconciler};
use crate::shared_cache::SharedCache;
use crate::tenancy::Tenancy;

/// Name of this controller in metrics, logs and spans.
pub const CONTROLLER: &str = "myresource";

/// This controller in [`crate::CONTROLLERS`].
pub const REGISTRATION: Registration = Registration { name: CONTROLLER, default_concurrency: 4, build };

/// How long a MyResource blocked by a foreign ConfigMap waits before checking again; the foreign
/// ConfigMap is not in the cache, so its removal raises no event here.
const CONFLICT_RECHECK: Duration = Duration::from_secs(120);

/// What a reconcile reads besides the MyResource itself.
pub struct Context {
    pub base: Arc<ControllerContext<MyResource>>,
    pub config_maps: Store<ConfigMap>,
    pub written: Arc<WrittenStatuses>,
    /// Where the operator may write.
    pub tenancy: Arc<Tenancy>,
}

/// Statuses this controller wrote. Until the MyResource cache shows a write, the written status
/// stands in for the cached one: the reconcile triggered by the owned ConfigMap's creation
/// usually runs before the MyResource's own watch event arrives, and without this it would see no
/// status and write the same one again. Afterwards the record tells this controller's status
/// writes (no reconcile needed) from anyone else's (reconcile, to restore it).
#[derive(Debug, Default)]
pub struct WrittenStatuses(std::sync::Mutex<HashMap<String, Written>>);

#[derive(Debug)]
struct Written {
    /// The resourceVersion the write returned.
    version: String,
    status: MyResourceStatus,
    at: Instant,
    /// The cache has shown this write (or something newer).
    caught_up: bool,
}

/// A written status stands in for the cache at most this long (a cache that never shows the
/// write, e.g. after an etcd restore moved resourceVersions back, is trusted again after it).
const WRITTEN_STATUS_TTL: Duration = Duration::from_secs(60);

/// Whether resourceVersion `seen` is at least `written`. resourceVersions are opaque except for
/// the order the API defines (KEP-5504): same length compares lexically, longer is newer.
fn at_least(seen: &str, written: &str) -> bool {
    (seen.len(), seen) >= (written.len(), written)
}

impl WrittenStatuses {
    /// Forgets every status written: a new term starts with no record.
    pub fn clear(&self) {
        self.lock().clear();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Written>> {
        self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn record(&self, written: &MyResource) {
        let (Some(uid), Some(version), Some(status)) =
            (written.uid(), written.metadata.resource_version.clone(), written.status.clone())
        else {
            return;
        };
        self.lock().insert(uid, Written { version, status, at: Instant::now(), caught_up: false });
    }

    /// `cached`, with the status this controller last wrote when the cache has not caught up
    /// with that write yet.
    fn freshest<'a>(&self, cached: &'a MyResource) -> Cow<'a, MyResource> {
        let Some(uid) = cached.uid() else { return Cow::Borrowed(cached) };
        let mut map = self.lock();
        let Some(written) = map.get_mut(&uid).filter(|w| !w.caught_up) else { return Cow::Borrowed(cached) };
        let seen = cached.metadata.resource_version.as_deref().unwrap_or_default();
        if at_least(seen, &written.version) || written.at.elapsed() >= WRITTEN_STATUS_TTL {
            written.caught_up = true;
            return Cow::Borrowed(cached);
        }
        let mut fresher = cached.clone();
        fresher.status = Some(written.status.clone());
        Cow::Owned(fresher)
    }

    /// Whether `status` is the one this controller last wrote for `uid`.
    fn is_ours(&self, uid: &str, status: Option<&MyResourceStatus>) -> bool {
        self.lock().get(uid).map(|w| &w.status) == status
    }

    /// Forgets the objects not in `live`.
    fn retain(&self, live: &std::collections::HashSet<String>) {
        self.lock().retain(|uid, _| live.contains(uid));
    }
}

/// The name of the ConfigMap a MyResource owns.
pub fn config_map_name(resource: &MyResource) -> String {
    format!("{}-configmap", resource.name_any())
}

/// The ConfigMap `resource` wants, or why it cannot have one (an invalid or reserved name, a
/// protected namespace).
pub fn desired_config_map(resource: &MyResource, tenancy: &Tenancy) -> Result<DesiredConfigMap> {
    let name = config_map_name(resource);
    owned_config_map::validate_name(&name)?;
    tenancy.check_name(&name)?;
    let namespace = resource.namespace().ok_or(Error::MissingField("metadata.namespace"))?;
    tenancy.check_namespace(&namespace)?;
    Ok(DesiredConfigMap {
        namespace,
        name,
        owner: OwnerReference {
            // As controller-runtime sets it: the owner's foreground deletion waits for the copy.
            block_owner_deletion: Some(true),
            ..resource.controller_owner_ref(&()).ok_or(Error::MissingField("metadata.uid"))?
        },
        data: BTreeMap::from([("message".to_owned(), resource.spec.message.clone())]),
    })
}

/// The status after a reconcile: Ready with the ConfigMap's name, or Failed with the reason.
pub fn desired_status(resource: &MyResource, outcome: Result<&str, &Error>) -> MyResourceStatus {
    let previous = resource.status.as_ref().map(|s| s.conditions.as_slice()).unwrap_or_default();
    let generation = resource.metadata.generation;
    let (phase, config_map_name, condition) = match outcome {
        Ok(name) => (
            Phase::Ready,
            Some(name.to_owned()),
            ready_condition(
                previous,
                ConditionStatus::True,
                Reason::ConfigMapSynced,
                format!("ConfigMap {name} holds the message"),
                generation,
                now(),
            ),
        ),
        Err(error) => {
            let reason = error.reason();
            let phase = if error.is_transient() { Phase::Pending } else { Phase::Failed };
            (
                phase,
                None,
                ready_condition(previous, ConditionStatus::False, reason, error.condition_message(), generation, now()),
            )
        }
    };
    MyResourceStatus {
        phase: Some(phase),
        config_map_name,
        observed_generation: generation,
        conditions: vec![condition],
    }
}

impl Reconciler for Context {
    type Object = MyResource;

    /// Statuses written in an earlier term say nothing now: another replica may have led since.
    fn start_term(&self) {
        self.written.clear();
    }

    /// Reconciles one MyResource: ConfigMap first, then status, each written only when it
    /// differs.
    async fn reconcile(&self, resource: Arc<MyResource>) -> Result<Requeue> {
        let resource = self.written.freshest(&resource);
        reconcile_inner(&resource, self).await
    }
}

async fn reconcile_inner(resource: &MyResource, context: &Context) -> Result<Requeue> {
    let base = &context.base;
    let written = match desired_config_map(resource, &context.tenancy) {
        Ok(desired) => owned_config_map::ensure(&base.client, &context.config_maps, &desired)
            .await
            .map(|outcome| (outcome, desired.name)),
        Err(error) => Err(error),
    };
    let (outcome, requeue) = match written {
        Ok((write, name)) => {
            let verb = match write {
                WriteOutcome::Created => Some("Created"),
                WriteOutcome::Updated => Some("Updated"),
                WriteOutcome::Unchanged => None,
            };
            if let Some(verb) = verb {
                let note = format!("{verb} ConfigMap {name}");
                base.publish(resource, EventType::Normal, &format!("ConfigMap{verb}"), verb, note).await;
            }
            (Ok(name), Requeue::OnChange)
        }
        Err(error) if error.is_transient() => {
            // Say why the resource is not Ready yet; if even that write fails, the retry will.
            let status = desired_status(resource, Err(&error));
            let _ = write_status(resource, context, &status).await;
            return Err(error);
        }
        Err(error) => {
            base.terminal(&error);
            let requeue = match error {
                Error::ConfigMapConflict { .. } => Requeue::After(CONFLICT_RECHECK),
                _ => Requeue::OnChange,
            };
            (Err(error), requeue)
        }
    };
    let status = desired_status(resource, outcome.as_deref());
    if write_status(resource, context, &status).await? {
        base.warn_if_not_ready(resource, &status.conditions, "Reconcile").await;
    }
    Ok(requeue)
}

/// Writes `status` unless the resource shows it already; remembers what it wrote (see
/// [`WrittenStatuses`]). Returns whether it wrote.
async fn write_status(resource: &MyResource, context: &Context, status: &MyResourceStatus) -> Result<bool> {
    let written = context.base.update_status(resource, resource.status.as_ref(), status).await?;
    if let Some(written) = &written {
        context.written.record(written);
    }
    Ok(written.is_some())
}

/// The MyResources a ConfigMap event concerns: its controller owner, if that is a MyResource.
fn owners_of(config_map: &ConfigMap) -> Option<ObjectRef<MyResource>> {
    let namespace = config_map.namespace()?;
    controller_of_kind::<MyResource>(&config_map.metadata).map(|owner| ObjectRef::new(&owner.name).within(&namespace))
}

/// The MyResource changes worth a reconcile: new objects, spec changes (a new generation), and
/// statuses written by someone else (cleared or overwritten: restored). This controller's own
/// status writes and metadata-only updates are skipped, as controller-runtime's
/// GenerationChangedPredicate does; their reconcile would find nothing to do and, with the
/// ConfigMap cache a moment behind, cost a redundant create and read.
fn worth_reconciling(
    resources: &SharedCache<MyResource>,
    written: Arc<WrittenStatuses>,
) -> impl futures::Stream<Item = (ObjectRef<MyResource>, Priority)> + Send + 'static {
    let store = resources.store();
    let mut seen: std::collections::HashMap<String, i64> = std::collections::HashMap::new();
    resources
        .subscribe()
        .filter(move |(resource, _)| {
            let (Some(uid), Some(generation)) = (resource.uid(), resource.metadata.generation) else {
                return futures::future::ready(true);
            };
            let new_generation = seen.insert(uid.clone(), generation) != Some(generation);
            let foreign_status = !written.is_ours(&uid, resource.status.as_ref());
            // Forget deleted objects now and then, so the maps stay the size of the cache.
            if seen.len() > 2 * store.len() + 64 {
                let live: std::collections::HashSet<String> = store.state().iter().filter_map(|r| r.uid()).collect();
                seen.retain(|uid, _| live.contains(uid));
                written.retain(&live);
            }
            futures::future::ready(new_generation || foreign_status)
        })
        .map(|(resource, priority)| (ObjectRef::from_obj(&*resource), priority))
}

/// This controller over the shared caches: MyResources whose generation changed, and the
/// ConfigMaps they own.
fn build(caches: &mut CacheSet, env: &ControllerEnv) -> Built {
    let resources = caches.get::<MyResource>();
    let config_maps = caches.get::<ConfigMap>();
    let context = Arc::new(Context {
        base: env.context(CONTROLLER),
        config_maps: config_maps.store(),
        written: Arc::default(),
        tenancy: env.tenancy.clone(),
    });
    let primary = resources.clone();
    let written = context.written.clone();
    Controller::new(context.clone(), context.base.clone(), &resources)
        .source(move || worth_reconciling(&primary, written.clone()).boxed())
        .watches(&config_maps, owners_of)
        .into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crd_types::MyResourceSpec;

    fn resource(name: &str, message: &str) -> MyResource {
        let mut resource = MyResource::new(name, MyResourceSpec { message: message.into() });
        resource.metadata.namespace = Some("ns".into());
        resource.metadata.uid = Some("uid-1".into());
        resource.metadata.generation = Some(3);
        resource
    }

    #[test]
    fn desired_config_map_is_named_after_the_resource_and_owned_by_it() -> Result<()> {
        let desired = desired_config_map(&resource("hello", "hi there"), &Tenancy::default())?;
        assert_eq!(desired.name, "hello-configmap");
        assert_eq!(desired.namespace, "ns");
        assert_eq!(desired.data.get("message").map(String::as_str), Some("hi there"));
        assert_eq!(desired.owner.kind, "MyResource");
        assert_eq!(desired.owner.uid, "uid-1");
        assert_eq!(desired.owner.controller, Some(true));
        assert_eq!(desired.owner.block_owner_deletion, Some(true), "as controller-runtime sets it");
        Ok(())
    }

    #[test]
    fn a_name_too_long_for_a_config_map_is_a_permanent_error() {
        let error = desired_config_map(&resource(&"a".repeat(250), "hi"), &Tenancy::default()).err();
        assert!(matches!(error, Some(Error::InvalidConfigMapName { .. })), "{error:?}");
        assert!(!error.is_some_and(|e| e.is_transient()));
    }

    #[test]
    fn ready_status_names_the_config_map_and_the_generation() {
        let status = desired_status(&resource("hello", "hi"), Ok("hello-configmap"));
        assert_eq!(status.phase, Some(Phase::Ready));
        assert_eq!(status.config_map_name.as_deref(), Some("hello-configmap"));
        assert_eq!(status.observed_generation, Some(3));
        assert_eq!(status.conditions[0].status, ConditionStatus::True);
        assert_eq!(status.conditions[0].reason, "ConfigMapSynced");
    }

    #[test]
    fn a_conflict_fails_with_its_reason_and_no_config_map_name() {
        let conflict = Error::ConfigMapConflict {
            namespace: "ns".into(),
            name: "hello-configmap".into(),
            owner: "MyResource/hello".into(),
        };
        let status = desired_status(&resource("hello", "hi"), Err(&conflict));
        assert_eq!(status.phase, Some(Phase::Failed));
        assert_eq!(status.config_map_name, None);
        assert_eq!(status.conditions[0].reason, "ConfigMapConflict");
        assert!(status.conditions[0].message.contains("not owned by MyResource/hello"));
    }

    #[test]
    fn an_unchanged_outcome_reproduces_the_stored_status_exactly() {
        let mut stored = resource("hello", "hi");
        stored.status = Some(desired_status(&stored, Ok("hello-configmap")));
        let again = desired_status(&stored, Ok("hello-configmap"));
        assert_eq!(stored.status, Some(again), "so a resync writes nothing");
    }

    #[test]
    fn a_written_status_stands_in_for_a_cache_that_has_not_caught_up() {
        let written = WrittenStatuses::default();
        let mut after_write = resource("hello", "hi");
        after_write.metadata.resource_version = Some("7".into());
        after_write.status = Some(desired_status(&after_write, Ok("hello-configmap")));
        written.record(&after_write);

        let mut stale = resource("hello", "hi");
        stale.metadata.resource_version = Some("5".into());
        assert_eq!(written.freshest(&stale).status, after_write.status, "the cache is behind our write");

        let mut caught_up = resource("hello", "hi");
        caught_up.metadata.resource_version = Some("8".into());
        assert_eq!(written.freshest(&caught_up).status, None, "a newer cached object wins");
        assert_eq!(written.freshest(&stale).status, None, "and the written status no longer stands in");
        assert!(written.is_ours("uid-1", after_write.status.as_ref()), "but is remembered as ours");
        assert!(!written.is_ours("uid-1", None), "a cleared status is someone else's");
    }

    #[test]
    fn resource_versions_compare_as_the_api_defines_not_as_numbers() {
        assert!(at_least("10", "9"), "longer is newer");
        assert!(!at_least("9", "10"));
        assert!(at_least("123", "123"));
        assert!(at_least("124", "123") && !at_least("123", "124"), "same length: lexical");
    }

    #[test]
    fn config_map_events_map_to_their_controlling_my_resource() -> Result<()> {
        let desired = desired_config_map(&resource("hello", "hi"), &Tenancy::default())?;
        let owner = owners_of(&desired.to_config_map());
        assert_eq!(owner, Some(ObjectRef::new("hello").within("ns")));
        let mut foreign = desired.to_config_map();
        foreign.metadata.owner_references = None;
        assert_eq!(owners_of(&foreign), None);
        Ok(())
    }
}
