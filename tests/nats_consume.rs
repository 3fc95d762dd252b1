//! Consumer groups on NATS (SPEC §4.3, §4.4): a group is one JetStream durable consumer
//! shared by every replica. Real nats-server, real gateways (in process and the binary),
//! real tonic clients. `#[ignore]`d: `.ci/test` runs them when a server is there.

mod support;

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant},
};

use spike_gateway::events::nats::partition_of;
use spike_gateway::proto::{
    ConsumeOpen, ConsumeOrdering, DeleteConsumerGroupRequest, EraseUserRequest, EventType,
    ListConsumerGroupsRequest, Nak, SeekConsumerGroupRequest, Term, consume_request,
    seek_consumer_group_request,
};
use support::{
    admin::{Store, admin, authed, nats_store},
    consume::*,
    *,
};
use tonic::Code;

/// Two gateway replicas on one NATS stream.
async fn two_replicas() -> (Store, TestApp, TestApp) {
    let store = nats_store();
    let a = spawn_app_with(&store.flags()).await;
    let b = spawn_app_with(&store.flags()).await;
    (store, a, b)
}

fn wait(millis: i32) -> Option<prost_types::Duration> {
    Some(prost_types::Duration {
        seconds: i64::from(millis / 1000),
        nanos: (millis % 1000) * 1_000_000,
    })
}

#[tokio::test]
#[ignore = "needs nats-server or NATS_URL; .ci/test runs it when one is there"]
async fn members_on_two_replicas_split_200_events_exactly_once() {
    let (_store, ra, rb) = two_replicas().await;
    let mut plain = rb.subscribe(from_beginning()).await.unwrap();
    let open = ConsumeOpen {
        max_in_flight: 8,
        ..open_request("split")
    };
    let mut a = join(&ra, open.clone()).await.unwrap();
    let mut b = join(&rb, open).await.unwrap();
    post_events(&ra, "u", 0..100).await;
    post_events(&rb, "u", 100..200).await;

    let mut seen: BTreeMap<u64, char> = BTreeMap::new();
    let mut per_member = [0usize; 2];
    while seen.len() < 200 {
        let (name, delivery) = tokio::select! {
            d = a.next() => ('a', d.unwrap()),
            d = b.next() => ('b', d.unwrap()),
        };
        assert_eq!(delivery.attempt, 1, "nothing fails, nothing is redelivered");
        let member = if name == 'a' { &a } else { &b };
        member.ack(vec![seq(&delivery)]).await;
        per_member[usize::from(name == 'b')] += 1;
        if let Some(first) = seen.insert(seq(&delivery), name) {
            panic!("{} delivered twice ({first} then {name})", seq(&delivery));
        }
    }
    assert_eq!(
        seen.keys().copied().collect::<Vec<_>>(),
        (1..=200).collect::<Vec<_>>()
    );
    assert!(
        per_member.iter().all(|&n| n > 0),
        "members on both replicas worked: {per_member:?}"
    );
    a.assert_quiet().await;
    b.assert_quiet().await;
    assert_eq!(take(&mut plain, 200).await.len(), 200);
}

#[tokio::test]
#[ignore = "needs nats-server or NATS_URL; .ci/test runs it when one is there"]
async fn a_replica_killed_mid_delivery_loses_nothing() {
    let store = nats_store();
    let survivor_app = spawn_app_with(&store.flags()).await;
    let dir = tempfile::tempdir().unwrap();
    let mut command = real_binary::command(dir.path(), KEY);
    let flags = store.flags();
    let flag = |name: &str| {
        let at = flags.iter().position(|f| *f == name).unwrap();
        flags[at + 1].to_owned()
    };
    command
        .env("GATEWAY_STORE", "nats")
        .env("NATS_URL", flag("--nats-url"))
        .env("GATEWAY_NATS_STREAM", flag("--nats-stream"))
        .env("GATEWAY_NATS_SUBJECT_PREFIX", flag("--nats-subject-prefix"));
    let mut doomed_gateway = real_binary::start(command).expect("the binary starts on NATS");
    let open = ConsumeOpen {
        max_in_flight: 5,
        ack_wait: wait(2000),
        ..open_request("failover")
    };
    let mut doomed = join_at(doomed_gateway.grpc, open.clone()).await.unwrap();
    post_events(&survivor_app, "u", 0..5).await;
    let held: BTreeSet<u64> = doomed.take(5).await.iter().map(seq).collect();
    let mut survivor = join(&survivor_app, open).await.unwrap();
    survivor.assert_quiet().await;
    // SIGKILL: the replica says nothing; JetStream's ack_wait gives its deliveries back.
    doomed_gateway.child.kill().unwrap();
    doomed_gateway.child.wait().unwrap();
    let redelivered = survivor.take(5).await;
    assert_eq!(redelivered.iter().map(seq).collect::<BTreeSet<_>>(), held);
    assert!(
        redelivered.iter().all(|d| d.attempt >= 2),
        "{redelivered:?}"
    );
    survivor.ack(redelivered.iter().map(seq).collect()).await;
    survivor.assert_quiet().await;
}

#[tokio::test]
#[ignore = "needs nats-server or NATS_URL; .ci/test runs it when one is there"]
async fn a_members_end_and_shutdown_return_its_deliveries_at_once() {
    let (_store, ra, mut rb) = two_replicas().await;
    // The default ack_wait (30 s): what comes back within the test's 5 s was nak'd.
    let open = ConsumeOpen {
        max_in_flight: 3,
        ..open_request("handover")
    };
    let mut leaving = join(&rb, open.clone()).await.unwrap();
    post_events(&ra, "u", 0..6).await;
    let first: BTreeSet<u64> = leaving.take(3).await.iter().map(seq).collect();
    let mut stays = join(&ra, open.clone()).await.unwrap();
    let others = stays.take(3).await;
    stays.ack(others.iter().map(seq).collect()).await;
    drop(leaving);
    let back = stays.take(3).await;
    assert_eq!(back.iter().map(seq).collect::<BTreeSet<_>>(), first);
    assert!(back.iter().all(|d| d.attempt == 2), "{back:?}");

    // Shutdown of replica b: its member ends UNAVAILABLE, what it held goes to a's member.
    let mut on_b = join(&rb, open).await.unwrap();
    post_events(&ra, "u", 6..7).await;
    let held = on_b.next().await.unwrap();
    stays.ack(back.iter().map(seq).collect()).await;
    let stopping = tokio::spawn(async move { rb.stop().await });
    assert_eq!(on_b.end().await.code(), Code::Unavailable);
    // Within `next`'s 5 s, not after the 30 s ack_wait: it was nak'd at shutdown. (The
    // attempt JetStream reports for it may be 1 again: its delivery to b's pull, which
    // the shutdown dropped, can be counted as not delivered.)
    let again = stays.next().await.unwrap();
    assert_eq!(seq(&again), seq(&held));
    tokio::time::timeout(Duration::from_secs(10), stopping)
        .await
        .expect("replica b stops")
        .unwrap();
}

#[tokio::test]
#[ignore = "needs nats-server or NATS_URL; .ci/test runs it when one is there"]
async fn ack_wait_redelivers_and_acked_never_returns() {
    let store = nats_store();
    let app = spawn_app_with(&store.flags()).await;
    let mut member = join(
        &app,
        ConsumeOpen {
            ack_wait: wait(1000),
            ..open_request("slow")
        },
    )
    .await
    .unwrap();
    post_events(&app, "u", 0..1).await;
    let first = member.next().await.unwrap();
    assert_eq!(first.attempt, 1);
    let started = Instant::now();
    let again = member.next().await.unwrap();
    assert_eq!((seq(&again), again.attempt), (seq(&first), 2));
    assert!(
        started.elapsed() >= Duration::from_millis(800),
        "redelivered after ack_wait, not at once: {:?}",
        started.elapsed()
    );
    member.ack(vec![seq(&again)]).await;
    tokio::time::sleep(Duration::from_millis(1200)).await; // one ack_wait: the ack must hold
    member.assert_quiet().await;
}

#[tokio::test]
#[ignore = "needs nats-server or NATS_URL; .ci/test runs it when one is there"]
async fn nak_with_and_without_delay_redelivers_and_term_never_does() {
    let store = nats_store();
    let app = spawn_app_with(&store.flags()).await;
    let mut member = join(&app, open_request("naks")).await.unwrap();
    post_events(&app, "u", 0..2).await;
    let got = member.take(2).await;
    let (naked, termed) = (seq(&got[0]), seq(&got[1]));
    member
        .send(consume_request::Request::Term(Term {
            sequences: vec![termed],
            reason: "poison".into(),
        }))
        .await;
    member
        .send(consume_request::Request::Nak(Nak {
            sequences: vec![naked],
            delay: None,
        }))
        .await;
    let again = member.next().await.unwrap();
    assert_eq!((seq(&again), again.attempt), (naked, 2));
    // A delayed nak: nats-server 2.9 honours `-NAK {"delay": ...}`.
    member
        .send(consume_request::Request::Nak(Nak {
            sequences: vec![naked],
            delay: wait(1500),
        }))
        .await;
    let started = Instant::now();
    let third = member.next().await.unwrap();
    assert_eq!((seq(&third), third.attempt), (naked, 3));
    assert!(
        started.elapsed() >= Duration::from_millis(1200),
        "the nak's delay was kept: {:?}",
        started.elapsed()
    );
    member.ack(vec![naked]).await;
    member.assert_quiet().await;
}

#[tokio::test]
#[ignore = "needs nats-server or NATS_URL; .ci/test runs it when one is there"]
async fn max_in_flight_caps_a_members_deliveries_exactly() {
    let store = nats_store();
    let app = spawn_app_with(&store.flags()).await;
    let mut member = join(
        &app,
        ConsumeOpen {
            max_in_flight: 3,
            ..open_request("capped")
        },
    )
    .await
    .unwrap();
    post_events(&app, "u", 0..10).await;
    let first = member.take(3).await;
    assert_eq!(first.iter().map(seq).collect::<Vec<_>>(), vec![1, 2, 3]);
    member.assert_quiet().await;
    member.ack(vec![seq(&first[0])]).await;
    let one_more = member.take(1).await;
    assert_eq!(seq(&one_more[0]), 4, "the next in sequence order");
    member.assert_quiet().await;
}

#[tokio::test]
#[ignore = "needs nats-server or NATS_URL; .ci/test runs it when one is there"]
async fn another_filter_on_another_replica_is_a_failed_precondition() {
    let (_store, ra, rb) = two_replicas().await;
    let _first = join(&ra, open_request("defined")).await.unwrap();
    let status = join(
        &rb,
        ConsumeOpen {
            event_types: vec![EventType::RecordChange as i32],
            ..open_request("defined")
        },
    )
    .await
    .err()
    .expect("a different filter is refused");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(
        status.message().contains("event_types"),
        "{}",
        status.message()
    );
    let status = join(
        &rb,
        ConsumeOpen {
            ordering: ConsumeOrdering::PerUser as i32,
            ..open_request("defined")
        },
    )
    .await
    .err()
    .expect("a different ordering is refused");
    assert_eq!(status.code(), Code::FailedPrecondition);
    // The same definition joins on either replica.
    join(&rb, open_request("defined")).await.unwrap();
}

/// `n` user ids whose events fall in `n` different partitions.
fn users_in_distinct_partitions(n: usize) -> Vec<String> {
    let mut seen = BTreeSet::new();
    (0..)
        .map(|k| format!("u{k}"))
        .filter(|user| seen.insert(partition_of(user)))
        .take(n)
        .collect()
}

/// The next delivery of either member, named `'a'` or `'b'`.
async fn either(a: &mut TestMember, b: &mut TestMember) -> (char, spike_gateway::proto::Delivery) {
    tokio::select! {
        d = a.next() => ('a', d.unwrap()),
        d = b.next() => ('b', d.unwrap()),
    }
}

#[tokio::test]
#[ignore = "needs nats-server or NATS_URL; .ci/test runs it when one is there"]
async fn per_user_ordering_across_two_replicas_and_three_users() {
    let (_store, ra, rb) = two_replicas().await;
    let open = ConsumeOpen {
        ordering: ConsumeOrdering::PerUser as i32,
        ..open_request("ordered")
    };
    let users = users_in_distinct_partitions(3);
    for n in 0..18 {
        post_events(&ra, &users[n as usize % 3], n..n + 1).await;
    }
    // a holds at most one; it takes one user's first event.
    let mut a = join(
        &ra,
        ConsumeOpen {
            max_in_flight: 1,
            ..open.clone()
        },
    )
    .await
    .unwrap();
    let first_a = a.next().await.unwrap();
    // While a holds it unacked, b (another replica) gets the two other users' first
    // events: users proceed in parallel, across replicas.
    let mut b = join(
        &rb,
        ConsumeOpen {
            max_in_flight: 10,
            ..open
        },
    )
    .await
    .unwrap();
    let first_b = b.take(2).await;
    let user =
        |d: &spike_gateway::proto::Delivery| d.event.as_ref().unwrap().application_user_id.clone();
    let firsts: BTreeSet<u64> = std::iter::once(&first_a).chain(&first_b).map(seq).collect();
    assert_eq!(firsts, BTreeSet::from([1, 2, 3]), "each user's first event");
    // Nothing more: each user's next event waits for the previous one's ack.
    a.assert_quiet().await;
    b.assert_quiet().await;

    // Then every event, acked one at a time in an order that is not the stream's: a user
    // never has two in flight, and each user's events come in sequence order.
    let mut in_flight: BTreeMap<String, (char, u64)> = BTreeMap::new();
    let mut order: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for (name, d) in [('a', &first_a), ('b', &first_b[0]), ('b', &first_b[1])] {
        in_flight.insert(user(d), (name, seq(d)));
        order.entry(user(d)).or_default().push(seq(d));
    }
    let mut members = BTreeSet::new();
    let mut acked = 0;
    while acked < 18 {
        // The newest-held first: not the stream's order.
        let (held_user, (name, sequence)) = in_flight
            .iter()
            .max_by_key(|(_, (_, s))| *s)
            .map(|(u, h)| (u.clone(), *h))
            .unwrap();
        in_flight.remove(&held_user);
        members.insert(name);
        let member = if name == 'a' { &a } else { &b };
        member.ack(vec![sequence]).await;
        acked += 1;
        if order[&held_user].len() == 6 {
            continue;
        }
        // The user's next event comes (to either member) once the previous is acked.
        let (name, d) = either(&mut a, &mut b).await;
        assert!(
            in_flight.insert(user(&d), (name, seq(&d))).is_none(),
            "two events of {} in flight at once: {d:?}",
            user(&d)
        );
        order.entry(user(&d)).or_default().push(seq(&d));
    }
    for (user, sequences) in &order {
        assert_eq!(sequences.len(), 6, "{user}");
        assert!(sequences.is_sorted(), "{user}: {sequences:?}");
    }
    assert_eq!(members.len(), 2, "both replicas' members took work");
    a.assert_quiet().await;
    b.assert_quiet().await;
}

async fn list(app: &TestApp) -> Vec<spike_gateway::proto::ConsumerGroupInfo> {
    admin(app)
        .await
        .list_consumer_groups(authed(ListConsumerGroupsRequest {}))
        .await
        .unwrap()
        .into_inner()
        .groups
}

#[tokio::test]
#[ignore = "needs nats-server or NATS_URL; .ci/test runs it when one is there"]
async fn list_seek_and_delete_act_on_the_shared_group() {
    let (_store, ra, rb) = two_replicas().await;
    let mut member = join(
        &ra,
        ConsumeOpen {
            provider_slugs: vec!["garmin".into()],
            ..open_request("ops")
        },
    )
    .await
    .unwrap();
    post_events(&ra, "u", 0..5).await;
    member.take(5).await;
    member.ack(vec![1, 2]).await;
    // Listed from the other replica: the group lives in JetStream.
    let row = eventually(Duration::from_secs(5), "the acks are applied", async || {
        list(&rb).await.into_iter().find(|g| g.acked_through == 2)
    })
    .await;
    assert_eq!(
        (row.group.as_str(), row.in_flight, row.pending),
        ("ops", 3, 3)
    );
    assert_eq!(row.provider_slugs, vec!["garmin".to_owned()]);
    assert_eq!(row.ack_wait.unwrap().seconds, 30);
    assert!(row.created_at.is_some());

    let moved = admin(&rb)
        .await
        .seek_consumer_group(authed(SeekConsumerGroupRequest {
            group: "ops".into(),
            start: Some(seek_consumer_group_request::Start::AfterSequence(3)),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(moved.next_sequence, 4);
    let again = member.take(2).await;
    assert_eq!(again.iter().map(seq).collect::<Vec<_>>(), vec![4, 5]);

    let deleted = admin(&ra)
        .await
        .delete_consumer_group(authed(DeleteConsumerGroupRequest {
            group: "ops".into(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(deleted.members_ended, 1);
    assert_eq!(member.end().await.code(), Code::FailedPrecondition);
    assert!(list(&rb).await.is_empty());
    let missing = admin(&rb)
        .await
        .delete_consumer_group(authed(DeleteConsumerGroupRequest {
            group: "ops".into(),
        }))
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
}

#[tokio::test]
#[ignore = "needs nats-server or NATS_URL; .ci/test runs it when one is there"]
async fn erasure_removes_the_users_events_from_the_groups_work() {
    let store = nats_store();
    let app = spawn_app_with(&store.flags()).await;
    let mut member = join(
        &app,
        ConsumeOpen {
            max_in_flight: 1,
            ..open_request("erase")
        },
    )
    .await
    .unwrap();
    post_events(&app, "gone", 0..1).await;
    post_events(&app, "kept", 1..2).await;
    post_events(&app, "gone", 2..3).await;
    let held = member.next().await.unwrap();
    assert_eq!(held.event.unwrap().application_user_id, "gone");
    admin(&app)
        .await
        .erase_user(authed(EraseUserRequest {
            application_user_id: "gone".into(),
        }))
        .await
        .unwrap();
    member.ack(vec![1]).await;
    let next = member.next().await.unwrap();
    assert_eq!(next.event.unwrap().application_user_id, "kept");
    member.ack(vec![2]).await;
    member.assert_quiet().await;
    // The group's floor stays honest: nothing after the erased events was skipped.
    let row = eventually(Duration::from_secs(5), "the acks are applied", async || {
        list(&app)
            .await
            .into_iter()
            .find(|g| g.acked_through >= 2 && g.in_flight == 0)
    })
    .await;
    assert_eq!(row.pending, 0);
}
