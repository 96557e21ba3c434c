//! The election against an in-memory Lease endpoint that enforces resourceVersion
//! preconditions like the API server, on tokio's paused clock (so "unchanged for the lease
//! duration" is measured exactly). The end-to-end tests prove the same against the real API
//! server with real processes, skewed clocks and injected network faults.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::jiff;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::fake::*;
use super::*;

/// A candidate that has seen no record waits one lease duration (4 s) before creating the Lease:
/// a leader whose Lease was just deleted would have re-created it by then.
#[tokio::test(start_paused = true)]
async fn a_missing_lease_is_created_naming_this_replica_after_one_lease_duration() -> anyhow::Result<()> {
    let fake = Arc::new(Mutex::new(FakeLeases::default()));
    let a = elector(&fake, "a")?;
    let started = Instant::now();
    assert!(a.acquire(&CancellationToken::new()).await);
    let waited = started.elapsed();
    assert!(waited >= Duration::from_secs(4) && waited < Duration::from_secs(5), "waited {waited:?}");
    let lease = lease_in(&fake).ok_or_else(|| anyhow::anyhow!("no lease"))?;
    assert_eq!(holder(&lease), "a");
    assert_eq!(lease.spec.and_then(|s| s.lease_transitions), Some(0));
    Ok(())
}

fn delete_lease(fake: &Arc<Mutex<FakeLeases>>) {
    if let Ok(mut fake) = fake.lock() {
        fake.lease = None;
    }
}

/// Deleting the Lease under a leader and a standby: the standby treats the deletion like an
/// unchanged record and waits; the leader re-creates the Lease at its next renewal and keeps
/// leading; the standby then sees the new record and never creates one of its own.
#[tokio::test(start_paused = true)]
async fn a_deleted_lease_is_recreated_by_its_leader_and_never_taken_by_a_standby() -> anyhow::Result<()> {
    let fake = Arc::new(Mutex::new(FakeLeases::default()));
    seed(&fake, held_by("other", jiff::Timestamp::now()));
    delete_lease(&fake);
    let a = elector(&fake, "a")?;
    let b = elector(&fake, "b")?;
    assert!(a.acquire(&CancellationToken::new()).await, "a leads after waiting out its first look");
    assert_eq!(b.attempt(None).await, Ok(Attempt::HeldBy("a".into())));

    let stop = CancellationToken::new();
    let renewing = tokio::spawn({
        let stop = stop.clone();
        async move { a.keep_renewing(&stop).await }
    });
    for _ in 0..20 {
        delete_lease(&fake);
        // Right after the deletion, the standby finds no Lease: it must not create one.
        assert_eq!(b.attempt(None).await, Ok(Attempt::Vanished));
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert_eq!(holder_in(&fake), "a", "the leader re-created its Lease");
        assert_eq!(b.attempt(None).await, Ok(Attempt::HeldBy("a".into())));
    }
    assert!(!renewing.is_finished(), "the leader kept leading through every deletion");
    stop.cancel();
    assert_eq!(renewing.await?, Ok(()));
    let creates_by_b = fake.lock().map(|f| f.writes.iter().filter(|(_, holder)| holder == "b").count()).unwrap_or(1);
    assert_eq!(creates_by_b, 0, "the standby never wrote the Lease");
    Ok(())
}

/// A Lease deleted after its leader died is free one lease duration after the standby last saw
/// it change, as if it were still there unrenewed.
#[tokio::test(start_paused = true)]
async fn a_deleted_lease_is_taken_only_once_the_last_record_seen_expired() -> anyhow::Result<()> {
    let fake = Arc::new(Mutex::new(FakeLeases::default()));
    seed(&fake, held_by("dead", jiff::Timestamp::now()));
    let b = elector(&fake, "b")?;
    assert_eq!(b.attempt(None).await, Ok(Attempt::HeldBy("dead".into())));
    let seen = Instant::now();
    tokio::time::sleep(Duration::from_secs(1)).await;
    delete_lease(&fake);
    assert!(b.acquire(&CancellationToken::new()).await);
    let waited = seen.elapsed();
    assert!(waited >= Duration::from_secs(4) && waited < Duration::from_secs(5), "waited {waited:?}");
    assert_eq!(holder_in(&fake), "b");
    Ok(())
}

/// A leader that finds another holder when it re-creates its deleted Lease stops at once.
#[tokio::test(start_paused = true)]
async fn a_leader_whose_lease_was_recreated_by_another_stops_at_its_next_renewal() -> anyhow::Result<()> {
    let fake = Arc::new(Mutex::new(FakeLeases::default()));
    let a = elector(&fake, "a")?;
    assert!(a.acquire(&CancellationToken::new()).await);
    delete_lease(&fake);
    seed(&fake, held_by("intruder", jiff::Timestamp::now()));
    let started = Instant::now();
    let lost = a.keep_renewing(&CancellationToken::new()).await;
    assert_eq!(lost, Err(LeadershipLost::HeldBy("intruder".into())));
    assert!(started.elapsed() <= Duration::from_millis(600), "stopped at the first renewal");
    Ok(())
}

/// A live leader keeps changing the record; whatever its renewTime says (an hour ago: the
/// candidate's clock is far ahead; an hour ahead: far behind), the candidate never takes it.
/// Once the record stops changing, it takes over one lease duration later by its own clock.
#[tokio::test(start_paused = true)]
async fn expiry_is_judged_by_the_candidates_own_clock_never_by_timestamps() -> anyhow::Result<()> {
    for skew in [-3600, 3600] {
        let fake = Arc::new(Mutex::new(FakeLeases::default()));
        let stamp = |offset: i64| jiff::Timestamp::now().checked_add(jiff::SignedDuration::from_secs(offset));
        seed(&fake, held_by("leader", stamp(skew)?));
        let leader_alive = CancellationToken::new();
        let renewing = tokio::spawn({
            let (fake, alive) = (fake.clone(), leader_alive.clone());
            async move {
                let mut beat = 0;
                while !alive.is_cancelled() {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    beat += 1;
                    if let Ok(mut fake) = fake.lock() {
                        fake.store(held_by("leader", stamp(skew + beat).unwrap_or_default()));
                    }
                }
            }
        });
        let b = elector(&fake, "b")?;
        let shutdown = CancellationToken::new();
        let campaign = tokio::time::timeout(Duration::from_secs(30), b.acquire(&shutdown)).await;
        assert!(campaign.is_err(), "skew {skew}: took a live lease");
        assert_eq!(holder_in(&fake), "leader");

        leader_alive.cancel();
        renewing.await?;
        let died = Instant::now();
        assert!(b.acquire(&shutdown).await);
        let waited = died.elapsed();
        assert_eq!(holder_in(&fake), "b");
        // At least a lease duration after the last change; at most that plus one jittered poll.
        assert!(waited >= Duration::from_millis(3500), "skew {skew}: took over after {waited:?}");
        assert!(waited <= Duration::from_millis(4000 + 600), "skew {skew}: took over after {waited:?}");
    }
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn a_takeover_that_races_another_write_gets_a_conflict_and_does_not_lead() -> anyhow::Result<()> {
    let fake = Arc::new(Mutex::new(FakeLeases::default()));
    seed(&fake, held_by("", jiff::Timestamp::now()));
    // Between our read and our write, another candidate's takeover lands.
    if let Ok(mut fake) = fake.lock() {
        fake.before_put = Some(Box::new(|lease| *lease = Some(held_by("c", jiff::Timestamp::now()))));
    }
    let b = elector(&fake, "b")?;
    assert_eq!(b.try_acquire_or_renew().await?, Attempt::Conflict);
    assert_eq!(holder_in(&fake), "c");
    // The next attempt reads the new holder and leaves it alone.
    assert_eq!(b.try_acquire_or_renew().await?, Attempt::HeldBy("c".into()));
    let writes = fake.lock().map(|f| f.writes.clone()).unwrap_or_default();
    assert!(writes.iter().all(|(_, holder)| holder != "b"), "b wrote the lease: {writes:?}");
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn a_free_lease_is_taken_at_once_and_released_conditionally() -> anyhow::Result<()> {
    let fake = Arc::new(Mutex::new(FakeLeases::default()));
    seed(&fake, held_by("", jiff::Timestamp::now()));
    let a = elector(&fake, "a")?;
    let started = Instant::now();
    assert!(a.acquire(&CancellationToken::new()).await);
    assert!(started.elapsed() < Duration::from_millis(100), "a released lease is free at once");
    let transitions = lease_in(&fake).and_then(|l| l.spec).and_then(|s| s.lease_transitions);
    assert_eq!(transitions, Some(4));

    a.release().await;
    let released = lease_in(&fake).and_then(|l| l.spec).unwrap_or_default();
    assert_eq!(released.holder_identity.as_deref(), Some(""));
    assert_eq!(released.lease_duration_seconds, Some(1));

    // Leading again, but someone else wrote the Lease since: the release must not touch it.
    assert!(a.acquire(&CancellationToken::new()).await);
    seed(&fake, held_by("intruder", jiff::Timestamp::now()));
    a.release().await;
    assert_eq!(holder_in(&fake), "intruder");
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn a_leader_cut_off_stops_exactly_at_the_renew_deadline_and_does_not_release() -> anyhow::Result<()> {
    let fake = Arc::new(Mutex::new(FakeLeases::default()));
    let a = elector(&fake, "a")?;
    assert!(a.acquire(&CancellationToken::new()).await);
    let renewing = CancellationToken::new();
    // A few good renewals first.
    let good = tokio::time::timeout(Duration::from_secs(2), a.keep_renewing(&renewing)).await;
    assert!(good.is_err(), "renewing keeps going while the API server answers");
    let writes_before = fake.lock().map(|f| f.writes.len()).unwrap_or_default();
    assert!(writes_before >= 4, "renewed every retry period: {writes_before} writes");

    if let Ok(mut fake) = fake.lock() {
        fake.silent = true;
    }
    let cut_off = Instant::now();
    let outcome = a.keep_renewing(&renewing).await;
    assert_eq!(outcome, Err(LeadershipLost::RenewDeadline(Duration::from_secs(3))));
    // The deadline counts from the last renewal that was sent, before the cut.
    assert!(cut_off.elapsed() <= Duration::from_secs(3), "stopped after {:?}", cut_off.elapsed());
    a.release().await;
    let writes_after = fake.lock().map(|f| f.writes.len()).unwrap_or_default();
    assert_eq!(writes_after, writes_before, "no write after losing the lease");
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn renewing_stops_between_attempts_when_told() -> anyhow::Result<()> {
    let fake = Arc::new(Mutex::new(FakeLeases::default()));
    let a = elector(&fake, "a")?;
    assert!(a.acquire(&CancellationToken::new()).await);
    let stop = CancellationToken::new();
    stop.cancel();
    assert_eq!(a.keep_renewing(&stop).await, Ok(()));
    a.release().await;
    assert_eq!(holder_in(&fake), "");
    Ok(())
}

/// A term's writes are bounded by the renew deadline after its last renewal was sent; outside a
/// term there is no such bound.
#[tokio::test(start_paused = true)]
async fn a_term_ends_one_lease_duration_after_its_last_renewal_and_not_at_all_outside_one() -> anyhow::Result<()> {
    let fake = Arc::new(Mutex::new(FakeLeases::default()));
    let term = Arc::new(TermDeadline::default());
    let a = elector(&fake, "a")?.with_term_deadline(term.clone());
    assert_eq!(term.get(), None);
    let shutdown = CancellationToken::new();
    assert!(a.acquire(&shutdown).await);
    let end = term.get().ok_or_else(|| anyhow::anyhow!("no term deadline while leading"))?;
    assert_eq!(end, Instant::now() + Duration::from_secs(3), "the renew deadline after the write (paused clock)");
    let stop = CancellationToken::new();
    let renewing = tokio::spawn({
        let stop = stop.clone();
        async move {
            let result = a.keep_renewing(&stop).await;
            a.release().await;
            result
        }
    });
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let later = term.get().ok_or_else(|| anyhow::anyhow!("no term deadline while leading"))?;
    assert!(later > end, "each renewal moves the end of the term");
    stop.cancel();
    assert_eq!(renewing.await?, Ok(()));
    assert_eq!(term.get(), None, "released: no term");
    Ok(())
}

/// A term with a write given up unanswered less than a lease duration ago is not released (the
/// write may still land): the Lease expires on its own. One given up longer ago does not hold the
/// release back, and the next term starts with none.
#[tokio::test(start_paused = true)]
async fn a_term_with_a_write_given_up_unanswered_is_not_released() -> anyhow::Result<()> {
    let fake = Arc::new(Mutex::new(FakeLeases::default()));
    let term = Arc::new(TermDeadline::default());
    let a = elector(&fake, "a")?.with_term_deadline(term.clone());
    assert!(a.acquire(&CancellationToken::new()).await);
    term.abandoned_write();
    a.release().await;
    assert_eq!(holder_in(&fake), "a", "not released");
    assert!(a.acquire(&CancellationToken::new()).await, "a holds it still and renews");
    assert_eq!(term.last_abandoned_write(), None, "a new term starts clean");
    term.abandoned_write();
    tokio::time::sleep(Duration::from_millis(4100)).await;
    assert!(a.acquire(&CancellationToken::new()).await);
    a.release().await;
    assert_eq!(holder_in(&fake), "", "released: the write was given up more than a lease duration ago");
    Ok(())
}

/// A Lease released, taken over by a replica whose takeover this one did not see, then deleted:
/// the record this replica holds names nobody, yet it still waits a lease duration from its last
/// change before creating the Lease (the new holder re-creates it meanwhile).
#[tokio::test(start_paused = true)]
async fn a_released_then_deleted_lease_is_not_taken_before_a_lease_duration() -> anyhow::Result<()> {
    let fake = Arc::new(Mutex::new(FakeLeases::default()));
    seed(&fake, held_by("", jiff::Timestamp::now()));
    let c = elector(&fake, "c")?;
    // c reads the released record; B's takeover lands first; c's takeover gets a 409.
    if let Ok(mut fake) = fake.lock() {
        fake.before_put = Some(Box::new(|lease: &mut Option<Lease>| {
            *lease = Some(held_by("b", jiff::Timestamp::now()));
        }));
    }
    assert_eq!(c.attempt(None).await, Ok(Attempt::Conflict));
    delete_lease(&fake);
    assert_eq!(c.attempt(None).await, Ok(Attempt::Vanished), "must not create while b may lead");
    tokio::time::sleep(Duration::from_millis(4100)).await;
    assert_eq!(c.attempt(None).await.map(|a| matches!(a, Attempt::Leading(_))), Ok(true));
    Ok(())
}
