//! The generated CRDs say what SPEC §3 promises: names, scope, validation, printer columns,
//! the status subresource and descriptions that make `kubectl explain` useful.

use crd_types::{MAX_MESSAGE_LENGTH, MessageBroadcast, MyResource};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
    CustomResourceDefinition, CustomResourceDefinitionVersion, JSONSchemaProps,
};
use kube::CustomResourceExt;

fn only_version(crd: &CustomResourceDefinition) -> &CustomResourceDefinitionVersion {
    assert_eq!(crd.spec.versions.len(), 1, "one served version");
    &crd.spec.versions[0]
}

fn root_schema(crd: &CustomResourceDefinition) -> &JSONSchemaProps {
    only_version(crd).schema.as_ref().and_then(|s| s.open_api_v3_schema.as_ref()).expect("a structural schema")
}

fn property<'a>(schema: &'a JSONSchemaProps, path: &[&str]) -> &'a JSONSchemaProps {
    path.iter().fold(schema, |schema, name| {
        schema.properties.as_ref().and_then(|p| p.get(*name)).unwrap_or_else(|| panic!("property {name} in {path:?}"))
    })
}

fn printer_columns(crd: &CustomResourceDefinition) -> Vec<(String, String)> {
    only_version(crd)
        .additional_printer_columns
        .iter()
        .flatten()
        .map(|c| (c.name.clone(), c.json_path.clone()))
        .collect()
}

#[test]
fn my_resource_has_the_names_of_the_client_go_tutorial() {
    let crd = MyResource::crd();
    assert_eq!(crd.metadata.name.as_deref(), Some("myresources.example.com"));
    assert_eq!(crd.spec.group, "example.com");
    assert_eq!(crd.spec.scope, "Namespaced");
    assert_eq!(crd.spec.names.kind, "MyResource");
    assert_eq!(crd.spec.names.plural, "myresources");
    assert_eq!(crd.spec.names.singular.as_deref(), Some("myresource"));
    assert_eq!(crd.spec.names.short_names.as_deref(), Some(&["mr".to_owned()][..]));
    assert_eq!(crd.spec.names.categories, None, "category `all` is not used");
    let version = only_version(&crd);
    assert_eq!(version.name, "v1");
    assert!(version.served && version.storage);
}

#[test]
fn my_resource_message_is_required_and_bounded() {
    let crd = MyResource::crd();
    let schema = root_schema(&crd);
    let spec = property(schema, &["spec"]);
    assert_eq!(spec.required.as_deref(), Some(&["message".to_owned()][..]));
    let message = property(schema, &["spec", "message"]);
    assert_eq!(message.type_.as_deref(), Some("string"));
    assert_eq!(message.min_length, Some(1));
    assert_eq!(message.max_length, Some(i64::from(MAX_MESSAGE_LENGTH)));
    assert!(
        i64::from(MAX_MESSAGE_LENGTH) * 4 < 1024 * 1024,
        "a message at the limit, 4 bytes per character, fits a ConfigMap"
    );
    assert_eq!(schema.required.as_deref(), Some(&["spec".to_owned()][..]));
}

#[test]
fn descriptions_make_kubectl_explain_useful() {
    let crd = MyResource::crd();
    let schema = root_schema(&crd);
    let described = |path: &[&str]| property(schema, path).description.clone().unwrap_or_default();
    assert!(described(&["spec", "message"]).contains("data.message"));
    assert!(described(&["status", "configMapName"]).contains("ConfigMap"));
    assert!(described(&["status", "observedGeneration"]).contains("generation"));
    assert!(schema.description.as_deref().unwrap_or_default().contains("<name>-configmap"));
}

#[test]
fn my_resource_status_has_phase_conditions_and_observed_generation() {
    let crd = MyResource::crd();
    let version = only_version(&crd);
    assert!(version.subresources.as_ref().and_then(|s| s.status.as_ref()).is_some(), "status subresource");
    let schema = root_schema(&crd);
    let phase = property(schema, &["status", "phase"]);
    let phases: Vec<String> = phase.enum_.iter().flatten().map(|v| v.0.to_string()).collect();
    assert_eq!(phases, ["\"Pending\"", "\"Ready\"", "\"Failed\""]);
    let conditions = property(schema, &["status", "conditions"]);
    assert_eq!(conditions.x_kubernetes_list_type.as_deref(), Some("map"));
    assert_eq!(conditions.x_kubernetes_list_map_keys.as_deref(), Some(&["type".to_owned()][..]));
    let condition = conditions.items.as_ref().map(|items| match items {
        k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::JSONSchemaPropsOrArray::Schema(s) => {
            s.as_ref().clone()
        }
        other => panic!("conditions items are one schema, got {other:?}"),
    });
    let condition = condition.expect("condition items");
    for field in ["type", "status", "reason", "message", "lastTransitionTime", "observedGeneration"] {
        property(&condition, &[field]);
    }
    let mut required = condition.required.clone().unwrap_or_default();
    required.sort();
    assert_eq!(required, ["lastTransitionTime", "reason", "status", "type"]);
}

#[test]
fn my_resource_prints_phase_config_map_and_age() {
    assert_eq!(
        printer_columns(&MyResource::crd()),
        [
            ("Phase".to_owned(), ".status.phase".to_owned()),
            ("ConfigMap".to_owned(), ".status.configMapName".to_owned()),
            ("Age".to_owned(), ".metadata.creationTimestamp".to_owned()),
        ]
    );
}

#[test]
fn message_broadcast_is_cluster_scoped_with_a_label_selector() {
    let crd = MessageBroadcast::crd();
    assert_eq!(crd.metadata.name.as_deref(), Some("messagebroadcasts.example.com"));
    assert_eq!(crd.spec.scope, "Cluster");
    assert_eq!(crd.spec.names.short_names.as_deref(), Some(&["mb".to_owned()][..]));
    let schema = root_schema(&crd);
    let mut required = property(schema, &["spec"]).required.clone().unwrap_or_default();
    required.sort();
    assert_eq!(required, ["message", "namespaceSelector"]);
    let selector = property(schema, &["spec", "namespaceSelector"]);
    property(selector, &["matchLabels"]);
    property(selector, &["matchExpressions"]);
    let name = property(schema, &["spec", "configMapName"]);
    assert_eq!(name.max_length, Some(253));
    assert!(name.pattern.is_some(), "configMapName is validated as a DNS subdomain");
    for field in ["matchedNamespaces", "readyNamespaces", "observedGeneration", "conditions"] {
        property(schema, &["status", field]);
    }
    let columns: Vec<String> = printer_columns(&crd).into_iter().map(|(name, _)| name).collect();
    assert_eq!(columns, ["Matched", "Ready", "Age"]);
}

#[test]
fn broadcast_config_map_name_defaults_to_the_broadcast_name() {
    let mut broadcast = MessageBroadcast::new(
        "greeting",
        crd_types::MessageBroadcastSpec {
            message: "hi".into(),
            namespace_selector: Default::default(),
            config_map_name: None,
        },
    );
    assert_eq!(broadcast.config_map_name(), "greeting");
    broadcast.spec.config_map_name = Some("hello".into());
    assert_eq!(broadcast.config_map_name(), "hello");
}

#[test]
fn tutorial_manifest_deserialises_unchanged() {
    let manifest =
        "apiVersion: example.com/v1\nkind: MyResource\nmetadata:\n  name: example\nspec:\n  message: Hello, World!\n";
    let resource: MyResource = serde_yaml::from_str(manifest).expect("the tutorial's manifest is a MyResource");
    assert_eq!(resource.spec.message, "Hello, World!");
    assert_eq!(resource.status, None);
}

/// Every schema node of `schema`, depth first.
fn nodes(schema: &JSONSchemaProps) -> Vec<&JSONSchemaProps> {
    let mut all = vec![schema];
    for child in schema.properties.iter().flat_map(|p| p.values()) {
        all.extend(nodes(child));
    }
    if let Some(k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::JSONSchemaPropsOrArray::Schema(
        item,
    )) = &schema.items
    {
        all.extend(nodes(item));
    }
    all
}

#[test]
fn the_api_server_knows_every_format_and_descriptions_are_one_line_per_paragraph() {
    for crd in crd_types::crds() {
        let name = crd.metadata.name.clone().unwrap_or_default();
        for node in nodes(root_schema(&crd)) {
            if let Some(format) = &node.format {
                assert!(["int32", "int64", "date-time", "byte"].contains(&format.as_str()), "{name}: format {format}");
            }
            if let Some(description) = &node.description {
                let broken = description.replace("\n\n", "").contains('\n');
                assert!(!broken, "{name}: a description broken mid-paragraph: {description:?}");
            }
        }
    }
    // The counters keep their lower bound without the format.
    let crds = crd_types::crds();
    let broadcast = crds.iter().find(|c| c.spec.names.kind == "MessageBroadcast").expect("the broadcast CRD");
    let ready = property(root_schema(broadcast), &["status", "readyNamespaces"]);
    assert_eq!((ready.format.as_deref(), ready.minimum), (None, Some(0.0)));
}
