//! Consumer groups on NATS (SPEC §4.3, §4.4): a group is a set of JetStream durable consumers
//! shared by every replica. Real nats-server, real gateways (in process and the binary),
//! real tonic clients. `#[ignore]`d: `.ci/test` runs them when a server is there.

mod support;

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant},
};

use spike_gateway::events::{
    CommittedEvent,
    nats::{partition_of, subject_token},
};
use spike_gateway::proto::{
    ConsumeOpen, ConsumeOrdering, EventType, Nak, SubscribeRequest, Term, consume_request,
};
use support::{
    admin::{Store, delete_group, erase_user, list_groups, nats_store, seek_group},
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
        ack_wait: millis(2000),
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
    support::consume::ack_wait_redelivers_and_acked_never_returns(&app, Duration::from_secs(1))
        .await;
}

#[tokio::test]
#[ignore = "needs nats-server or NATS_URL; .ci/test runs it when one is there"]
async fn nak_with_and_without_delay_redelivers_and_term_never_does() {
    let store = nats_store();
    let app = spawn_app_with(&store.flags()).await;
    let (mut member, naked) = nak_redelivers_and_term_never_does(&app).await;
    // A delayed nak: nats-server 2.9 honours `-NAK {"delay": ...}`.
    member
        .send(consume_request::Request::Nak(Nak {
            sequences: vec![naked],
            delay: millis(1500),
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
    max_in_flight_caps_deliveries_exactly(&app).await;
}

#[tokio::test]
#[ignore = "needs nats-server or NATS_URL; .ci/test runs it when one is there"]
async fn another_filter_on_another_replica_is_a_failed_precondition() {
    let (_store, ra, rb) = two_replicas().await;
    another_definition_is_a_failed_precondition(&ra, &rb).await;
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
        list_groups(&rb)
            .await
            .into_iter()
            .find(|g| g.acked_through == 2)
    })
    .await;
    assert_eq!(
        (row.group.as_str(), row.in_flight, row.pending),
        ("ops", 3, 3)
    );
    assert_eq!(row.provider_slugs, vec!["garmin".to_owned()]);
    assert_eq!(row.ack_wait.unwrap().seconds, 30);
    assert!(row.created_at.is_some());

    assert_eq!(seek_group(&rb, "ops", 3).await, 4);
    let again = member.take(2).await;
    assert_eq!(again.iter().map(seq).collect::<Vec<_>>(), vec![4, 5]);

    let deleted = delete_group(&ra, "ops").await.unwrap();
    assert_eq!(deleted.members_ended, 1);
    assert_eq!(member.end().await.code(), Code::FailedPrecondition);
    assert!(list_groups(&rb).await.is_empty());
    let missing = delete_group(&rb, "ops").await.unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
}

#[tokio::test]
#[ignore = "needs nats-server or NATS_URL; .ci/test runs it when one is there"]
async fn erasure_removes_the_users_events_from_the_groups_work() {
    let store = nats_store();
    let app = spawn_app_with(&store.flags()).await;
    let member = a_member_holds_an_event_of_a_user_erased_meanwhile(&app).await;
    erasure_leaves_only_the_other_users_work(&app, member).await;
}

/// The value of `--name` among the store's flags.
fn flag(store: &Store, name: &str) -> String {
    let at = store.flags.iter().position(|f| f == name).unwrap();
    store.flags[at + 1].clone()
}

/// The events stream's consumers: name → filter subject, read from NATS itself.
async fn stream_consumers(store: &Store) -> BTreeMap<String, String> {
    let client = async_nats::connect(flag(store, "--nats-url"))
        .await
        .unwrap();
    let stream = async_nats::jetstream::new(client)
        .get_stream(flag(store, "--nats-stream"))
        .await
        .unwrap();
    let mut consumers = stream.consumers();
    let mut out = BTreeMap::new();
    while let Some(info) = futures_util::StreamExt::next(&mut consumers).await {
        let info = info.unwrap();
        out.insert(info.name, info.config.filter_subject);
    }
    out
}

fn group_consumers(all: &BTreeMap<String, String>, group: &str) -> BTreeMap<String, String> {
    let anchor = format!("group_{group}");
    all.iter()
        .filter(|(name, _)| **name == anchor || name.starts_with(&format!("{anchor}@")))
        .map(|(name, subject)| (name.clone(), subject.clone()))
        .collect()
}

#[tokio::test]
#[ignore = "needs nats-server or NATS_URL; .ci/test runs it when one is there"]
async fn group_and_subscribe_filters_narrow_at_the_source() {
    let store = nats_store();
    let app = spawn_app_with(&store.flags()).await;
    let prefix = flag(&store, "--nats-subject-prefix");
    post_events(&app, "other", 0..1).await; // the stream holds only partitioned subjects
    let _typed = join(
        &app,
        ConsumeOpen {
            event_types: vec![EventType::RecordChange as i32],
            ..open_request("typed")
        },
    )
    .await
    .unwrap();
    let _one_user = join(
        &app,
        ConsumeOpen {
            ordering: ConsumeOrdering::PerUser as i32,
            application_user_ids: vec!["u.1".into()],
            ..open_request("one")
        },
    )
    .await
    .unwrap();
    let _every_user = join(
        &app,
        ConsumeOpen {
            ordering: ConsumeOrdering::PerUser as i32,
            ..open_request("all")
        },
    )
    .await
    .unwrap();
    let mut narrow = app
        .subscribe(SubscribeRequest {
            application_user_ids: vec!["u.1".into()],
            ..from_beginning()
        })
        .await
        .unwrap();
    post_events(&app, "u.1", 1..2).await;
    assert_eq!(next(&mut narrow).await.unwrap().application_user_id, "u.1");

    let consumers = stream_consumers(&store).await;
    assert_eq!(
        group_consumers(&consumers, "typed"),
        BTreeMap::from([(
            "group_typed".to_owned(),
            format!("{prefix}.event.record_change.*.*")
        )])
    );
    let partition = partition_of("u.1");
    assert_eq!(
        group_consumers(&consumers, "one"),
        BTreeMap::from([(
            "group_one".to_owned(),
            format!("{prefix}.event.*.u~2E1.p{partition}")
        )]),
        "a filter naming one user needs only that user's partition"
    );
    let all = group_consumers(&consumers, "all");
    assert_eq!(all.len(), 16, "{all:?}");
    for n in 0..16 {
        let subject = format!("{prefix}.event.*.*.p{n}");
        assert!(all.values().any(|s| *s == subject), "{subject}: {all:?}");
    }
    let user_subject = format!("{prefix}.event.*.u~2E1.*");
    assert!(
        consumers.values().any(|s| *s == user_subject),
        "Subscribe narrowed at the source: {consumers:?}"
    );
}

/// Publishes events the way releases before the partition token did: 4-token subjects.
async fn publish_unpartitioned(store: &Store, events: &[(&str, &str)]) {
    let client = async_nats::connect(flag(store, "--nats-url"))
        .await
        .unwrap();
    let jetstream = async_nats::jetstream::new(client);
    let prefix = flag(store, "--nats-subject-prefix");
    for (id, user) in events {
        let event = spike_gateway::proto::Event {
            event_id: (*id).into(),
            r#type: EventType::RecordChange as i32,
            application_user_id: (*user).into(),
            received_at: Some(prost_types::Timestamp::default()),
            ..Default::default()
        };
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", *id);
        let subject = format!("{prefix}.event.record_change.{}", subject_token(user));
        let payload = CommittedEvent::new(event).encoded(true);
        jetstream
            .publish_with_headers(subject, headers, payload)
            .await
            .unwrap()
            .await
            .unwrap();
    }
}

#[tokio::test]
#[ignore = "needs nats-server or NATS_URL; .ci/test runs it when one is there"]
async fn events_stored_before_partitions_reach_groups_and_subscribers_exactly_once() {
    let store = nats_store();
    // The stream as an older release left it: 4 events on 4-token subjects.
    spawn_app_with(&store.flags()).await.stop().await;
    let old = [
        ("old-1", "x"),
        ("old-2", "y"),
        ("old-3", "x"),
        ("old-4", "y"),
    ];
    publish_unpartitioned(&store, &old).await;
    let app = spawn_app_with(&store.flags()).await;
    post_events(&app, "x", 10..12).await; // 5, 6
    post_events(&app, "y", 12..14).await; // 7, 8
    let user_of = |sequence: u64| {
        if [1, 3, 5, 6].contains(&sequence) {
            "x"
        } else {
            "y"
        }
    };

    // Per user: every event once, each user's in sequence order across the two layouts.
    let mut per_user = join(
        &app,
        ConsumeOpen {
            ordering: ConsumeOrdering::PerUser as i32,
            ..open_request("ordered")
        },
    )
    .await
    .unwrap();
    let mut order: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for _ in 0..8 {
        let delivery = per_user.next().await.unwrap();
        assert_eq!(delivery.attempt, 1);
        let event = delivery.event.unwrap();
        assert_eq!(event.application_user_id, user_of(event.sequence));
        order
            .entry(event.application_user_id)
            .or_default()
            .push(event.sequence);
        per_user.ack(vec![event.sequence]).await;
    }
    per_user.assert_quiet().await;
    assert_eq!(
        order,
        BTreeMap::from([
            ("x".into(), vec![1, 3, 5, 6]),
            ("y".into(), vec![2, 4, 7, 8])
        ])
    );

    // Unordered: every event once, first deliveries in sequence order.
    let mut unordered = join(&app, open_request("plain")).await.unwrap();
    let got = unordered.take(8).await;
    assert_eq!(
        got.iter().map(seq).collect::<Vec<_>>(),
        (1..=8).collect::<Vec<_>>()
    );
    unordered.ack(got.iter().map(seq).collect()).await;
    unordered.assert_quiet().await;

    // Subscribe with a user filter sees both layouts.
    let mut x = app
        .subscribe(SubscribeRequest {
            application_user_ids: vec!["x".into()],
            ..from_beginning()
        })
        .await
        .unwrap();
    let seen: Vec<u64> = take(&mut x, 4).await.iter().map(|e| e.sequence).collect();
    assert_eq!(seen, vec![1, 3, 5, 6]);

    // Erasure finds the user's events in both layouts.
    erase_user(&app, "y").await;
    let mut everything = app.subscribe(from_beginning()).await.unwrap();
    let left: Vec<u64> = take(&mut everything, 4)
        .await
        .iter()
        .map(|e| e.sequence)
        .collect();
    assert_eq!(left, vec![1, 3, 5, 6]);
    assert_quiet(&mut everything).await;
}

#[tokio::test]
#[ignore = "needs nats-server or NATS_URL; .ci/test runs it when one is there"]
async fn terminated_is_counted_across_replicas_and_restarts() {
    let (store, mut ra, mut rb) = two_replicas().await;
    let open = ConsumeOpen {
        max_in_flight: 1,
        ..open_request("terms")
    };
    let mut a = join(&ra, open.clone()).await.unwrap();
    post_events(&ra, "u", 0..3).await;
    let on_a = a.next().await.unwrap();
    let mut b = join(&rb, open).await.unwrap();
    let on_b = b.next().await.unwrap();
    for (member, delivery) in [(&a, &on_a), (&b, &on_b)] {
        member
            .send(consume_request::Request::Term(Term {
                sequences: vec![seq(delivery)],
                reason: "poison".into(),
            }))
            .await;
    }
    // Both have room again: the third goes to either.
    let (name, third) = either(&mut a, &mut b).await;
    assert_eq!(seq(&third), 3);
    let member = if name == 'a' { &a } else { &b };
    member.ack(vec![3]).await;
    let row = eventually(Duration::from_secs(5), "both terms counted", async || {
        list_groups(&rb)
            .await
            .into_iter()
            .find(|g| g.terminated == 2 && g.in_flight == 0)
    })
    .await;
    assert_eq!((row.acked_through, row.pending, row.expired), (3, 0, 0));
    drop((a, b));
    ra.stop().await;
    rb.stop().await;
    let rc = spawn_app_with(&store.flags()).await;
    let row = list_groups(&rc).await.pop().unwrap();
    assert_eq!(
        (row.group.as_str(), row.terminated),
        ("terms", 2),
        "kept in NATS"
    );
}

#[tokio::test]
#[ignore = "needs nats-server or NATS_URL; .ci/test runs it when one is there"]
async fn events_retention_removed_before_the_group_read_them_are_counted_expired_once() {
    let store = nats_store();
    let short = [
        store.flags(),
        vec!["--retention", "2s", "--dedup-window", "1s"],
    ]
    .concat();
    let mut app = spawn_app_with(&short).await;
    drop(join(&app, open_request("late")).await.unwrap()); // the group exists, unread
    post_events(&app, "u", 0..3).await;
    // They expire one by one; each list counts what was removed since the last one.
    // (`pending` is JetStream's `num_pending`, which may lag behind the removal.)
    let row = eventually(
        Duration::from_secs(15),
        "retention removed 1..=3",
        async || list_groups(&app).await.into_iter().find(|g| g.expired >= 3),
    )
    .await;
    assert_eq!(row.expired, 3, "{row:?}");
    post_events(&app, "u", 3..4).await;
    let mut member = join(&app, open_request("late")).await.unwrap();
    let fourth = member.next().await.unwrap();
    assert_eq!(seq(&fourth), 4);
    member.ack(vec![4]).await;
    let row = eventually(Duration::from_secs(5), "the ack is applied", async || {
        list_groups(&app)
            .await
            .into_iter()
            .find(|g| g.acked_through == 4)
    })
    .await;
    assert_eq!(row.expired, 3, "counted once");
    drop(member);
    app.stop().await;
    let again = spawn_app_with(&short).await;
    assert_eq!(
        list_groups(&again).await.pop().unwrap().expired,
        3,
        "kept in NATS"
    );
}

#[tokio::test]
#[ignore = "needs nats-server or NATS_URL; .ci/test runs it when one is there"]
async fn seek_and_delete_act_on_every_partition_of_a_per_user_group() {
    let store = nats_store();
    let app = spawn_app_with(&store.flags()).await;
    let users = users_in_distinct_partitions(3);
    for n in 0..6 {
        post_events(&app, &users[n as usize % 3], n..n + 1).await;
    }
    let mut member = join(
        &app,
        ConsumeOpen {
            ordering: ConsumeOrdering::PerUser as i32,
            ..open_request("parts")
        },
    )
    .await
    .unwrap();
    let firsts = member.take(3).await;
    assert_eq!(
        firsts.iter().map(seq).collect::<BTreeSet<_>>(),
        BTreeSet::from([1, 2, 3])
    );
    member.ack(vec![1, 2, 3]).await;
    let seconds = member.take(3).await;
    assert_eq!(
        seconds.iter().map(seq).collect::<BTreeSet<_>>(),
        BTreeSet::from([4, 5, 6])
    );
    let row = eventually(Duration::from_secs(5), "the acks are applied", async || {
        list_groups(&app)
            .await
            .into_iter()
            .find(|g| g.acked_through == 3)
    })
    .await;
    assert_eq!((row.in_flight, row.pending), (3, 3));

    // Seek: every partition moves; what the member held is forgotten.
    assert_eq!(seek_group(&app, "parts", 4).await, 5);
    let again = member.take(2).await;
    assert_eq!(
        again.iter().map(seq).collect::<BTreeSet<_>>(),
        BTreeSet::from([5, 6])
    );
    member.assert_quiet().await;
    member.ack(vec![5, 6]).await;
    let row = eventually(Duration::from_secs(5), "the acks are applied", async || {
        list_groups(&app)
            .await
            .into_iter()
            .find(|g| g.in_flight == 0)
    })
    .await;
    assert_eq!((row.acked_through, row.pending), (6, 0));

    // Delete: every partition's consumer goes.
    let deleted = delete_group(&app, "parts").await.unwrap();
    assert_eq!(deleted.members_ended, 1);
    assert_eq!(member.end().await.code(), Code::FailedPrecondition);
    assert!(list_groups(&app).await.is_empty());
    let left = group_consumers(&stream_consumers(&store).await, "parts");
    assert!(left.is_empty(), "{left:?}");
}
