//! A cache that counted as synced forever after its first list hid a watch failing for minutes
//! (CRD deleted, rights revoked). Alone in its binary: it deletes the MyResource CRD, which no
//! test running beside it could survive.

use std::time::Duration;

use anyhow::{Result, ensure};
use e2e_tests::{Fixture, TEST_LEASE, eventually, http_get, install_crds, sample};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams};

const LEASE: &str = "cache-outage";

/// The leader's `/readyz` and `example_operator_cache_synced{resource="myresources"}`.
async fn readiness(replica: &e2e_tests::OperatorProcess) -> Result<(u16, String, Option<f64>)> {
    let (code, body) = http_get(replica.probe_port, "/readyz?verbose").await?;
    let synced = sample(&replica.metrics().await?, r#"example_operator_cache_synced{resource="myresources"}"#);
    Ok((code, body, synced))
}

/// The MyResource CRD deleted under a running leader: within the staleness bound (30 s) plus the
/// watch's retry backoff, `/readyz` fails (500, as Kubernetes' own) naming the cache and `cache_synced` reads 0; with the
/// CRD back, both recover.
#[tokio::test]
async fn a_cache_whose_watch_keeps_failing_fails_the_leaders_readiness_until_it_recovers() -> Result<()> {
    let f = Fixture::new("cache-outage").await?;
    let replica = f.replica("outage-a", LEASE, &TEST_LEASE)?;
    eventually(Duration::from_secs(60), "a ready leader", || async {
        let (code, _, synced) = readiness(&replica).await?;
        let leading = replica.master_status(LEASE).await? == 1.0;
        Ok((leading && code == 200 && synced == Some(1.0)).then_some(()))
    })
    .await?;

    let crds: Api<CustomResourceDefinition> = Api::all(f.client.clone());
    crds.delete("myresources.example.com", &DeleteParams::default()).await?;
    let (body, _) = eventually(Duration::from_secs(120), "readiness to fail naming the cache", || async {
        let (code, body, synced) = readiness(&replica).await?;
        Ok((code == 500 && synced == Some(0.0)).then_some((body, synced)))
    })
    .await?;
    ensure!(body.contains("myresources: the watch has failed for"), "{body}");

    install_crds(&f.client).await?;
    eventually(Duration::from_secs(120), "readiness to recover with the CRD back", || async {
        let (code, _, synced) = readiness(&replica).await?;
        Ok((code == 200 && synced == Some(1.0)).then_some(()))
    })
    .await?;
    replica.stop().await?;
    f.namespace.delete().await
}
