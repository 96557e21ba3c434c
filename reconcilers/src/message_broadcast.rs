//! The MessageBroadcast controller: keeps a ConfigMap copy of the message in every Active
//! namespace its selector matches, owned by the broadcast (so deleting it removes every copy),
//! removes copies from namespaces that stop matching, and never overwrites a ConfigMap it does not
//! own (those namespaces are reported as conflicts in status).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use crd_types::{ConditionStatus, MessageBroadcast, MessageBroadcastStatus};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, ListParams};
use kube::core::{Selector, SelectorExt};
use kube::runtime::events::EventType;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Resource, ResourceExt};

use crate::conditions::{Reason, now, ready_condition};
use crate::controller_context::{ControllerContext, Requeue};
use crate::error::{Error, Result};
use crate::owned_config_map::{self, DesiredConfigMap, WriteOutcome, controller_of_kind, controller_uid};
use crate::registry::{Built, CacheSet, ControllerEnv, Registration};
use crate::runtime::{Controller, Reconciler};
use crate::tenancy::Tenancy;

/// Name of this controller in metrics, logs and spans.
pub const CONTROLLER: &str = "messagebroadcast";

/// This controller in [`crate::CONTROLLERS`].
pub const REGISTRATION: Registration = Registration { name: CONTROLLER, default_concurrency: 2, build };

/// Copies written at once for one broadcast; bounds the burst on the API server.
const WRITE_PARALLELISM: usize = 16;

/// Conflicting namespaces named in the Ready condition before the list is cut short.
const CONFLICTS_NAMED: usize = 10;

/// How long a broadcast blocked by foreign ConfigMaps waits before checking again.
const CONFLICT_RECHECK: Duration = Duration::from_secs(120);

/// What a reconcile reads besides the broadcast itself.
pub struct Context {
    pub base: Arc<ControllerContext<MessageBroadcast>>,
    pub config_maps: Store<ConfigMap>,
    pub namespaces: Store<Namespace>,
    pub broadcasts: Store<MessageBroadcast>,
    /// Where each broadcast (by uid) is known to have a copy: (namespace, name).
    pub known: KnownCopies,
    /// `--watch-namespace`, where copies may be.
    pub scope: Option<String>,
    /// Where and how much the operator may write.
    pub tenancy: Arc<Tenancy>,
}

/// The copies this controller wrote or saw, per broadcast uid. The ConfigMap cache holds only
/// labelled copies: one whose label was removed drops out of it, and without this record a copy
/// in a namespace that also stopped matching would never be found again. A broadcast seen for the
/// first time by this process is looked up on the API server once ([`seed_known`]), so copies an
/// earlier process wrote, and whose label went while no operator ran, are found as well.
#[derive(Debug, Default)]
pub struct KnownCopies(std::sync::Mutex<HashMap<String, BTreeSet<(String, String)>>>);

impl KnownCopies {
    /// Forgets every copy: a new term looks its broadcasts' copies up on the API server again.
    pub fn clear(&self) {
        self.lock().clear();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, BTreeSet<(String, String)>>> {
        self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn knows(&self, uid: &str) -> bool {
        self.lock().contains_key(uid)
    }

    fn of(&self, uid: &str) -> BTreeSet<(String, String)> {
        self.lock().get(uid).cloned().unwrap_or_default()
    }

    fn set(&self, uid: &str, copies: BTreeSet<(String, String)>, live: &Store<MessageBroadcast>) {
        let mut known = self.lock();
        known.insert(uid.to_owned(), copies);
        // Broadcasts that are gone take their record with them.
        if known.len() > live.len() + 16 {
            let uids: BTreeSet<String> = live.state().iter().filter_map(|b| b.uid()).collect();
            known.retain(|uid, _| uids.contains(uid));
        }
    }
}

/// True for namespaces that may receive a copy: Active ones (not Terminating).
pub fn is_active(namespace: &Namespace) -> bool {
    let phase = namespace.status.as_ref().and_then(|s| s.phase.as_deref());
    namespace.metadata.deletion_timestamp.is_none() && phase.is_none_or(|p| p == "Active")
}

/// The broadcast's selector, or why it cannot be evaluated.
pub fn selector(broadcast: &MessageBroadcast) -> Result<Selector> {
    let expressions = broadcast.spec.namespace_selector.match_expressions.iter().flatten();
    for expression in expressions {
        let operator = expression.operator.as_str();
        if !["In", "NotIn", "Exists", "DoesNotExist"].contains(&operator) {
            return Err(Error::InvalidSelector(format!(
                "matchExpressions operator {operator:?} (key {:?}) is not one of In, NotIn, Exists, DoesNotExist",
                expression.key
            )));
        }
    }
    Selector::try_from(broadcast.spec.namespace_selector.clone()).map_err(|e| Error::InvalidSelector(e.to_string()))
}

/// Names of the Active namespaces `selector` matches, sorted.
pub fn matching_namespaces(selector: &Selector, namespaces: &[Arc<Namespace>]) -> BTreeSet<String> {
    namespaces.iter().filter(|ns| is_active(ns) && selector.matches(ns.labels())).map(|ns| ns.name_any()).collect()
}

/// The copy `broadcast` wants in `namespace`, or why it can have none (an invalid or reserved
/// name).
pub fn desired_copy(broadcast: &MessageBroadcast, namespace: &str, tenancy: &Tenancy) -> Result<DesiredConfigMap> {
    let name = broadcast.config_map_name().to_owned();
    owned_config_map::validate_name(&name)?;
    tenancy.check_name(&name)?;
    Ok(DesiredConfigMap {
        namespace: namespace.to_owned(),
        name,
        owner: OwnerReference {
            // As controller-runtime sets it: the owner's foreground deletion waits for the copy.
            block_owner_deletion: Some(true),
            ..broadcast.controller_owner_ref(&()).ok_or(Error::MissingField("metadata.uid"))?
        },
        data: BTreeMap::from([("message".to_owned(), broadcast.spec.message.clone())]),
    })
}

/// Result of writing every copy of one broadcast.
#[derive(Debug, Default, PartialEq)]
pub struct FanOut {
    pub matched: u32,
    /// Protected namespaces the selector matches: never written, not counted in `matched`.
    pub protected: Vec<String>,
    pub ready: u32,
    pub conflicts: Vec<String>,
    pub created: u32,
    pub updated: u32,
    pub deleted: u32,
}

/// The status describing `fan_out`, or a permanent `error` that stopped it.
pub fn desired_status(broadcast: &MessageBroadcast, fan_out: &FanOut, error: Option<&Error>) -> MessageBroadcastStatus {
    let previous = broadcast.status.as_ref().map(|s| s.conditions.as_slice()).unwrap_or_default();
    let generation = broadcast.metadata.generation;
    let (status, reason, message) = match error {
        Some(error) => (ConditionStatus::False, error.reason(), error.condition_message()),
        None if !fan_out.conflicts.is_empty() => {
            let mut named = fan_out.conflicts.iter().take(CONFLICTS_NAMED).cloned().collect::<Vec<_>>().join(", ");
            if fan_out.conflicts.len() > CONFLICTS_NAMED {
                named.push_str(&format!(" and {} more", fan_out.conflicts.len() - CONFLICTS_NAMED));
            }
            let message = format!(
                "ConfigMap {} exists and is not owned by this broadcast in namespaces: {named}",
                broadcast.config_map_name()
            );
            (ConditionStatus::False, Reason::ConfigMapConflict, message)
        }
        None => {
            let mut message = format!("{} of {} matching namespaces hold the message", fan_out.ready, fan_out.matched);
            if !fan_out.protected.is_empty() {
                let mut named = fan_out.protected.iter().take(CONFLICTS_NAMED).cloned().collect::<Vec<_>>().join(", ");
                if fan_out.protected.len() > CONFLICTS_NAMED {
                    named.push_str(&format!(" and {} more", fan_out.protected.len() - CONFLICTS_NAMED));
                }
                message.push_str(&format!("; protected namespaces receive no copy: {named}"));
            }
            (ConditionStatus::True, Reason::CopiesSynced, message)
        }
    };
    MessageBroadcastStatus {
        matched_namespaces: fan_out.matched,
        ready_namespaces: fan_out.ready,
        observed_generation: generation,
        conditions: vec![ready_condition(previous, status, reason, message, generation, now())],
    }
}

impl Reconciler for Context {
    type Object = MessageBroadcast;

    /// Copies known from an earlier term may have changed under another leader since.
    fn start_term(&self) {
        self.known.clear();
    }

    /// Reconciles one broadcast: copies into matching namespaces, stale copies out, then status.
    async fn reconcile(&self, broadcast: Arc<MessageBroadcast>) -> Result<Requeue> {
        reconcile_inner(&broadcast, self).await
    }
}

async fn reconcile_inner(broadcast: &MessageBroadcast, context: &Context) -> Result<Requeue> {
    let mut fan_out = FanOut::default();
    let permanent = match fan_out_copies(broadcast, context, &mut fan_out).await {
        Ok(()) => None,
        Err(error) if error.is_transient() => {
            // Record progress so far, then retry with backoff.
            let status = desired_status(broadcast, &fan_out, Some(&error));
            context.base.update_status(broadcast, broadcast.status.as_ref(), &status).await?;
            return Err(error);
        }
        Err(error) => {
            context.base.terminal(&error);
            Some(error)
        }
    };
    let base = &context.base;
    if fan_out.created + fan_out.updated + fan_out.deleted > 0 {
        let note = format!(
            "Copies created in {}, updated in {}, removed from {} namespaces",
            fan_out.created, fan_out.updated, fan_out.deleted
        );
        base.publish(broadcast, EventType::Normal, "CopiesUpdated", "Broadcast", note).await;
    }
    let status = desired_status(broadcast, &fan_out, permanent.as_ref());
    if base.update_status(broadcast, broadcast.status.as_ref(), &status).await?.is_some() {
        base.warn_if_not_ready(broadcast, &status.conditions, "Broadcast").await;
    }
    Ok(match (&permanent, fan_out.conflicts.is_empty()) {
        (None, true) => Requeue::OnChange,
        (None, false) => Requeue::After(CONFLICT_RECHECK),
        (Some(_), _) => Requeue::OnChange,
    })
}

/// Whether the API refused a write because the namespace is being deleted.
fn namespace_terminating(status: &kube::core::Status) -> bool {
    status.details.iter().flat_map(|details| details.causes.iter()).any(|cause| cause.reason == "NamespaceTerminating")
}

/// Writes every copy `broadcast` wants and deletes the ones it no longer wants, counting into
/// `fan_out`. Stops at the first transient error after the writes in flight finish.
async fn fan_out_copies(broadcast: &MessageBroadcast, context: &Context, fan_out: &mut FanOut) -> Result<()> {
    let selector = selector(broadcast)?;
    let tenancy = &context.tenancy;
    let (protected, wanted): (BTreeSet<String>, BTreeSet<String>) =
        matching_namespaces(&selector, &context.namespaces.state())
            .into_iter()
            .partition(|ns| tenancy.is_protected(ns));
    fan_out.protected = protected.into_iter().collect();
    fan_out.matched = u32::try_from(wanted.len()).unwrap_or(u32::MAX);
    let uid = broadcast.uid().ok_or(Error::MissingField("metadata.uid"))?;
    let name = broadcast.config_map_name().to_owned();
    // An invalid or reserved name, a missing owner, or a broadcast too large for the cap fails
    // the broadcast before any write: the copies it has stay as they are.
    desired_copy(broadcast, "", tenancy)?;
    tenancy.check_broadcast_size(broadcast.spec.message.len(), wanted.len())?;

    let client = &context.base.client;
    let cache = &context.config_maps;
    // Each copy is made when its write starts: only the writes in flight hold a copy of the
    // message (a 64 KiB message to 2,000 namespaces would otherwise hold 125 MiB at once).
    let outcomes: Vec<(String, Result<WriteOutcome>)> = futures::stream::iter(wanted.iter().cloned())
        .map(|namespace: String| async move {
            let written = match desired_copy(broadcast, &namespace, tenancy) {
                Ok(copy) => owned_config_map::ensure(client, cache, &copy).await,
                Err(error) => Err(error),
            };
            (namespace, written)
        })
        .buffer_unordered(WRITE_PARALLELISM)
        .collect()
        .await;
    // In namespace order, so the error reported (the first) is the same on every attempt.
    let mut outcomes = outcomes;
    outcomes.sort_by(|a, b| a.0.cmp(&b.0));
    let mut first_error = None;
    let mut written = Vec::new();
    for (namespace, outcome) in outcomes {
        match outcome {
            // The namespace began terminating after the cache last saw it Active: it no longer
            // takes a copy, which is not a failure of the broadcast.
            Err(Error::Kube(kube::Error::Api(status))) if namespace_terminating(&status) => {
                fan_out.matched = fan_out.matched.saturating_sub(1);
            }
            Ok(write) => {
                written.push(namespace.clone());
                fan_out.ready += 1;
                match write {
                    WriteOutcome::Created => fan_out.created += 1,
                    WriteOutcome::Updated => fan_out.updated += 1,
                    WriteOutcome::Unchanged => {}
                }
            }
            Err(Error::ConfigMapConflict { .. }) => fan_out.conflicts.push(namespace),
            Err(error) => {
                first_error.get_or_insert(error);
            }
        }
    }
    fan_out.conflicts.sort();

    // Copies of ours that are no longer wanted: namespace unselected, or the name changed.
    let stale: Vec<Arc<ConfigMap>> = cache
        .state()
        .into_iter()
        .filter(|cm| controller_uid(&cm.metadata) == Some(uid.as_str()))
        .filter(|cm| !wanted.contains(&cm.namespace().unwrap_or_default()) || cm.name_any() != name)
        .filter(|cm| {
            context
                .namespaces
                .get(&ObjectRef::new(&cm.namespace().unwrap_or_default()))
                .is_some_and(|ns| is_active(&ns))
        })
        .collect();
    // Copies known from earlier reconciles that are no longer wanted and are not in the cache
    // (their label was removed): read each; delete it if it is still ours.
    let cached: BTreeSet<(String, String)> = cache
        .state()
        .iter()
        .filter(|cm| controller_uid(&cm.metadata) == Some(uid.as_str()))
        .map(|cm| (cm.namespace().unwrap_or_default(), cm.name_any()))
        .collect();
    let unwanted = |(namespace, copy): &(String, String)| !wanted.contains(namespace) || *copy != name;
    if !context.known.knows(&uid) {
        match seed_known(context, &uid, &name).await {
            Ok(found) => context.known.set(&uid, found, &context.broadcasts),
            // Read again on the retry: the broadcast stays unknown until a lookup succeeds.
            Err(error) => {
                first_error.get_or_insert(error);
            }
        }
    }
    let lost: Vec<(String, String)> =
        context.known.of(&uid).into_iter().filter(|known| unwanted(known) && !cached.contains(known)).collect();
    let found = futures::stream::iter(lost)
        .map(|(namespace, copy)| async move {
            let api: Api<ConfigMap> = Api::namespaced(client.clone(), &namespace);
            api.get_opt(&copy).await
        })
        .buffer_unordered(WRITE_PARALLELISM)
        .try_collect::<Vec<Option<ConfigMap>>>()
        .await;
    let mut stale: Vec<Arc<ConfigMap>> = stale;
    match found {
        Ok(found) => stale.extend(
            found.into_iter().flatten().filter(|cm| controller_uid(&cm.metadata) == Some(uid.as_str())).map(Arc::new),
        ),
        Err(error) => {
            first_error.get_or_insert(error.into());
        }
    }
    let deleted = futures::stream::iter(stale)
        .map(|cm| async move { owned_config_map::delete(client, &cm).await })
        .buffer_unordered(WRITE_PARALLELISM)
        .try_collect::<Vec<()>>()
        .await;
    match deleted {
        Ok(done) => fan_out.deleted = u32::try_from(done.len()).unwrap_or(u32::MAX),
        Err(error) => {
            first_error.get_or_insert(error);
        }
    }
    // What is known from now on: the copies written or present, where they are wanted.
    let mut known: BTreeSet<(String, String)> = cached.into_iter().filter(|c| !unwanted(c)).collect();
    known.extend(written.into_iter().map(|namespace| (namespace, name.clone())));
    if first_error.is_some() {
        // A failed read or delete is tried again on the retry.
        known.extend(context.known.of(&uid).into_iter().filter(unwanted));
    }
    if context.known.knows(&uid) {
        context.known.set(&uid, known, &context.broadcasts);
    }
    first_error.map_or(Ok(()), Err)
}

/// Copies of the broadcast `uid` named `name` in the operator's namespaces, read from the API
/// server (metadata only, by name, a page at a time): the ones the cache does not hold because
/// their label is gone. Done once per broadcast and process.
async fn seed_known(context: &Context, uid: &str, name: &str) -> Result<BTreeSet<(String, String)>> {
    let api: Api<ConfigMap> = crate::registry::scoped(&context.base.client, context.scope.as_deref());
    let mut params = ListParams::default().fields(&format!("metadata.name={name}")).limit(500);
    let mut found = BTreeSet::new();
    loop {
        let page = api.list_metadata(&params).await?;
        found.extend(
            page.items
                .iter()
                .filter(|copy| controller_uid(&copy.metadata) == Some(uid))
                .map(|copy| (copy.namespace().unwrap_or_default(), copy.name_any())),
        );
        match page.metadata.continue_ {
            Some(token) if !token.is_empty() => params = params.continue_token(&token),
            _ => return Ok(found),
        }
    }
}

/// The broadcast controlling a ConfigMap copy, if any.
fn owner_of_copy(config_map: &ConfigMap) -> Option<ObjectRef<MessageBroadcast>> {
    controller_of_kind::<MessageBroadcast>(&config_map.metadata).map(|owner| ObjectRef::new(&owner.name))
}

/// The broadcasts a namespace event concerns: those whose selector matches it now, and those that
/// hold a copy in it (it may have been relabelled out of their selector).
pub fn broadcasts_for_namespace(
    namespace: &Namespace,
    broadcasts: &Store<MessageBroadcast>,
    config_maps: &Store<ConfigMap>,
) -> Vec<ObjectRef<MessageBroadcast>> {
    let name = namespace.name_any();
    let holding_copy: BTreeSet<String> = config_maps
        .state()
        .iter()
        .filter(|cm| cm.namespace().as_deref() == Some(name.as_str()))
        .filter_map(|cm| controller_uid(&cm.metadata).map(str::to_owned))
        .collect();
    broadcasts
        .state()
        .iter()
        .filter(|b| {
            let selected = selector(b).is_ok_and(|s| s.matches(namespace.labels()));
            let holds = b.uid().is_some_and(|uid| holding_copy.contains(&uid));
            selected || holds
        })
        .map(|b| ObjectRef::from_obj(b.as_ref()))
        .collect()
}

/// This controller over the shared caches: broadcasts, their copies, and the namespaces they
/// select or hold copies in.
fn build(caches: &mut CacheSet, env: &ControllerEnv) -> Built {
    let broadcasts = caches.get::<MessageBroadcast>();
    let config_maps = caches.get::<ConfigMap>();
    let namespaces = caches.get::<Namespace>();
    let context = Arc::new(Context {
        base: env.context(CONTROLLER),
        config_maps: config_maps.store(),
        namespaces: namespaces.store(),
        broadcasts: broadcasts.store(),
        known: KnownCopies::default(),
        scope: env.scope.clone(),
        tenancy: env.tenancy.clone(),
    });
    let (broadcast_store, config_map_store) = (broadcasts.store(), config_maps.store());
    Controller::new(context.clone(), context.base.clone(), &broadcasts)
        .owns_events(&broadcasts)
        .watches(&config_maps, owner_of_copy)
        .watches(&namespaces, move |namespace| broadcasts_for_namespace(namespace, &broadcast_store, &config_map_store))
        .into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crd_types::MessageBroadcastSpec;
    use k8s_openapi::api::core::v1::NamespaceStatus;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

    fn broadcast(match_labels: &[(&str, &str)]) -> MessageBroadcast {
        let selector = LabelSelector {
            match_labels: Some(match_labels.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()),
            match_expressions: None,
        };
        let mut broadcast = MessageBroadcast::new(
            "greeting",
            MessageBroadcastSpec { message: "hi".into(), namespace_selector: selector, config_map_name: None },
        );
        broadcast.metadata.uid = Some("b-uid".into());
        broadcast.metadata.generation = Some(2);
        broadcast
    }

    fn namespace(name: &str, labels: &[(&str, &str)], phase: &str) -> Arc<Namespace> {
        let mut namespace = Namespace::default();
        namespace.metadata.name = Some(name.into());
        namespace.metadata.labels = Some(labels.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect());
        namespace.status = Some(NamespaceStatus { phase: Some(phase.into()), ..Default::default() });
        Arc::new(namespace)
    }

    #[test]
    fn only_active_namespaces_matching_the_selector_are_selected() -> Result<()> {
        let namespaces = [
            namespace("a", &[("team", "x")], "Active"),
            namespace("b", &[("team", "y")], "Active"),
            namespace("c", &[("team", "x")], "Terminating"),
        ];
        let picked = matching_namespaces(&selector(&broadcast(&[("team", "x")]))?, &namespaces);
        assert_eq!(picked, BTreeSet::from(["a".to_owned()]));
        let everything = matching_namespaces(&selector(&broadcast(&[]))?, &namespaces);
        assert_eq!(everything, BTreeSet::from(["a".to_owned(), "b".to_owned()]), "{{}} selects every Active namespace");
        Ok(())
    }

    #[test]
    fn copies_are_owned_by_the_cluster_scoped_broadcast() -> Result<()> {
        let copy = desired_copy(&broadcast(&[]), "team-a", &Tenancy::default())?;
        assert_eq!(copy.name, "greeting");
        assert_eq!(copy.namespace, "team-a");
        assert_eq!(copy.owner.kind, "MessageBroadcast");
        assert_eq!(copy.owner.uid, "b-uid");
        assert_eq!(owner_of_copy(&copy.to_config_map()), Some(ObjectRef::new("greeting")));
        Ok(())
    }

    #[test]
    fn an_invalid_selector_is_a_permanent_error() {
        let mut bad = broadcast(&[]);
        bad.spec.namespace_selector.match_expressions =
            Some(vec![k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement {
                key: "team".into(),
                operator: "Near".into(),
                values: None,
            }]);
        let error = selector(&bad).err();
        assert!(matches!(&error, Some(Error::InvalidSelector(why)) if why.contains("\"Near\"")), "{error:?}");
        let status = desired_status(&bad, &FanOut::default(), error.as_ref());
        assert_eq!(status.conditions[0].reason, "InvalidSelector");
    }

    #[test]
    fn status_counts_and_names_conflicts() {
        let fan_out = FanOut { matched: 3, ready: 2, conflicts: vec!["b".into()], ..FanOut::default() };
        let status = desired_status(&broadcast(&[]), &fan_out, None);
        assert_eq!((status.matched_namespaces, status.ready_namespaces), (3, 2));
        assert_eq!(status.observed_generation, Some(2));
        assert_eq!(status.conditions[0].status, ConditionStatus::False);
        assert_eq!(status.conditions[0].reason, "ConfigMapConflict");
        assert!(status.conditions[0].message.ends_with("namespaces: b"));
        let synced = desired_status(&broadcast(&[]), &FanOut { matched: 2, ready: 2, ..FanOut::default() }, None);
        assert_eq!(synced.conditions[0].status, ConditionStatus::True);
    }

    #[test]
    fn a_write_refused_because_the_namespace_terminates_is_recognised() -> Result<()> {
        let refused: kube::core::Status = serde_json::from_value(serde_json::json!({
            "code": 403,
            "reason": "Forbidden",
            "message": "configmaps \"x\" is forbidden: unable to create new content in namespace gone because it is being terminated",
            "details": {"name": "x", "kind": "configmaps", "causes": [{"reason": "NamespaceTerminating", "message": "namespace gone is being terminated", "field": "metadata.namespace"}]},
        }))?;
        assert!(namespace_terminating(&refused));
        let forbidden: kube::core::Status =
            serde_json::from_value(serde_json::json!({"code": 403, "reason": "Forbidden", "message": "rbac"}))?;
        assert!(!namespace_terminating(&forbidden));
        Ok(())
    }

    /// A context over `namespaces` whose client counts the requests it is asked to send (and
    /// fails them).
    fn offline_context(
        namespaces: &[Arc<Namespace>],
        tenancy: Tenancy,
    ) -> (Context, Arc<std::sync::atomic::AtomicUsize>) {
        let requests = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = requests.clone();
        let service = tower::service_fn(move |_request: http::Request<kube::client::Body>| {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async { Err::<http::Response<kube::client::Body>, _>(std::io::Error::other("offline")) }
        });
        let metrics = crate::Metrics::new().unwrap_or_else(|error| panic!("metrics: {error}"));
        let env = ControllerEnv {
            client: kube::Client::new(service, "default"),
            metrics,
            instance: None,
            reconcile_timeout: Duration::from_secs(5),
            scope: None,
            tenancy: Arc::new(tenancy.clone()),
        };
        let (namespace_store, mut writer) = kube::runtime::reflector::store();
        for namespace in namespaces {
            writer.apply_watcher_event(&kube::runtime::watcher::Event::Apply((**namespace).clone()));
        }
        let context = Context {
            base: env.context(CONTROLLER),
            config_maps: kube::runtime::reflector::store().0,
            namespaces: namespace_store,
            broadcasts: kube::runtime::reflector::store().0,
            known: KnownCopies::default(),
            scope: None,
            tenancy: Arc::new(tenancy),
        };
        (context, requests)
    }

    #[tokio::test]
    async fn a_reserved_name_or_a_broadcast_past_the_byte_cap_fails_before_any_write() {
        let namespaces: Vec<_> = (0..10).map(|i| namespace(&format!("team-{i}"), &[], "Active")).collect();
        let mut reserved = broadcast(&[]);
        reserved.spec.config_map_name = Some("kube-root-ca.crt".into());
        let (context, requests) = offline_context(&namespaces, Tenancy::default());
        let error = fan_out_copies(&reserved, &context, &mut FanOut::default()).await.err();
        assert!(matches!(error, Some(Error::ReservedConfigMapName { .. })), "{error:?}");

        let mut large = broadcast(&[]);
        large.spec.message = "x".repeat(100);
        let tenancy = Tenancy { broadcast_max_bytes: 999, ..Tenancy::default() };
        let (context, requests_too_large) = offline_context(&namespaces, tenancy);
        let error = fan_out_copies(&large, &context, &mut FanOut::default()).await.err();
        assert!(
            matches!(error, Some(Error::BroadcastTooLarge { bytes: 1000, namespaces: 10, limit: 999 })),
            "{error:?}"
        );
        let error = error.unwrap_or_else(|| panic!("an error"));
        assert!(!error.is_transient());
        let status = desired_status(&large, &FanOut::default(), Some(&error));
        assert_eq!(status.conditions[0].reason, "BroadcastTooLarge");
        for sent in [requests, requests_too_large] {
            assert_eq!(sent.load(std::sync::atomic::Ordering::SeqCst), 0, "nothing was sent");
        }
    }

    #[tokio::test]
    async fn protected_namespaces_are_never_written_and_are_named_in_the_status() {
        let namespaces = vec![
            namespace("kube-system", &[], "Active"),
            namespace("operators", &[], "Active"),
            namespace("team", &[], "Active"),
        ];
        let mut tenancy = Tenancy::default();
        tenancy.protected_namespaces.insert("operators".into());
        let (context, requests) = offline_context(&namespaces, tenancy);
        let mut fan_out = FanOut::default();
        let error = fan_out_copies(&broadcast(&[]), &context, &mut fan_out).await.err();
        assert!(error.is_some_and(|e| e.is_transient()), "the one write (to team) fails offline");
        assert!(requests.load(std::sync::atomic::Ordering::SeqCst) > 0);
        assert_eq!(fan_out.matched, 1, "only team is matched");
        assert_eq!(fan_out.protected, ["kube-system", "operators"]);
        let status = desired_status(&broadcast(&[]), &FanOut { matched: 1, ready: 1, ..fan_out }, None);
        assert!(status.conditions[0].message.ends_with("protected namespaces receive no copy: kube-system, operators"));
    }
}
