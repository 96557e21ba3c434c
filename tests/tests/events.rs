//! Events tell the truth under the cases public reports against other operators found: an Event
//! deleted (by hand, or expired) under a series the operator keeps, and a Warning whose note is
//! longer than events.k8s.io accepts.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use crd_types::{MessageBroadcast, MessageBroadcastSpec};
use e2e_tests::{Fixture, RunningControllers, eventually};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, LabelSelectorRequirement};
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::json;

const CONVERGE: Duration = Duration::from_secs(60);

/// The Events in `namespace` about the object named `regarding` with `reason`.
async fn events(api: &Api<Event>, regarding: &str, reason: &str) -> Result<Vec<Event>> {
    let listed = api.list(&ListParams::default()).await?;
    Ok(listed
        .items
        .into_iter()
        .filter(|event| event.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(regarding))
        .filter(|event| event.reason.as_deref() == Some(reason))
        .collect())
}

/// kube-runtime's recorder patched the cached Event of a series: once that Event was deleted,
/// the next repair's event failed with 404 and was lost. Now the repeat starts a new Event.
#[tokio::test]
async fn a_repair_after_its_event_was_deleted_is_recorded_as_a_new_event() -> Result<()> {
    let f = Fixture::new("events-deleted").await?;
    let controllers = RunningControllers::start_in(&f.cluster, f.ns()).await?;
    let api: Api<Event> = Api::namespaced(f.client.clone(), f.ns());
    f.create("hello", "hi").await?;
    f.wait_ready("hello", CONVERGE).await?;

    let drift = |value: &'static str| {
        let patch = json!({"data": {"message": value}});
        let config_maps = f.config_maps.clone();
        async move { config_maps.patch("hello-configmap", &PatchParams::default(), &Patch::Merge(&patch)).await }
    };
    drift("edited once").await?;
    let first = eventually(CONVERGE, "an event for the first repair", || async {
        Ok(events(&api, "hello", "ConfigMapUpdated").await?.into_iter().next())
    })
    .await?;
    let name = first.metadata.name.clone().context("an event name")?;
    api.delete(&name, &DeleteParams::default()).await?;

    drift("edited twice").await?;
    let second = eventually(CONVERGE, "a new event for the second repair", || async {
        Ok(events(&api, "hello", "ConfigMapUpdated").await?.into_iter().next())
    })
    .await?;
    ensure!(second.metadata.name != Some(name), "the deleted event came back: {second:?}");
    controllers.stop().await?;
    f.namespace.delete().await
}

/// A Warning whose condition message is longer than an Event's note may be (1024 bytes) was
/// refused by the API server and never recorded; now it is recorded, cut on a character
/// boundary. The long message comes from the user: a selector operator of 1,100 characters.
#[tokio::test]
async fn a_warning_longer_than_an_event_note_is_recorded_cut_to_1024_bytes() -> Result<()> {
    let f = Fixture::new("events-long").await?;
    let controllers = RunningControllers::start_in(&f.cluster, f.ns()).await?;
    let name = format!("long-{}", &f.ns()[f.ns().len() - 6..]);
    let selector = LabelSelector {
        match_expressions: Some(vec![LabelSelectorRequirement {
            key: "team".into(),
            operator: "é".repeat(600),
            values: None,
        }]),
        match_labels: None,
    };
    let broadcast = MessageBroadcast::new(
        &name,
        MessageBroadcastSpec { message: "x".into(), namespace_selector: selector, config_map_name: None },
    );
    let broadcasts: Api<MessageBroadcast> = Api::all(f.client.clone());
    broadcasts.create(&PostParams::default(), &broadcast).await?;
    // Events about cluster-scoped objects go to `default`.
    let api: Api<Event> = Api::namespaced(f.client.clone(), "default");
    let warning = eventually(CONVERGE, "the InvalidSelector warning", || async {
        Ok(events(&api, &name, "InvalidSelector").await?.into_iter().next())
    })
    .await?;
    let note = warning.note.unwrap_or_default();
    ensure!(
        note.len() <= 1024 && note.ends_with("...") && note.starts_with("namespace selector is invalid"),
        "{} bytes: {note}",
        note.len()
    );
    let status = broadcasts.get(&name).await?.status.unwrap_or_default();
    let message = status.conditions.first().map(|c| c.message.len()).unwrap_or_default();
    ensure!(message > 1024, "the condition keeps the whole message ({message} bytes)");
    broadcasts.delete(&name, &DeleteParams::default()).await?;
    controllers.stop().await?;
    f.namespace.delete().await
}
