//! `EventStream/Consume` (SPEC §4.3) over a real gateway and real tonic clients: members
//! split a group's events, acks, naks, terms, `ack_wait`, `max_in_flight`, per-user
//! ordering, filter mismatches, restarts, and auth.

mod support;

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use spike_gateway::proto::{
    Ack, ConsumeOpen, ConsumeOrdering, Nak, Term, consume_request,
    event_stream_client::EventStreamClient,
};
use support::{admin::on_each_local_store, consume::*, *};
use tonic::Code;

#[tokio::test]
async fn two_members_split_200_events_exactly_once_while_subscribe_sees_all() {
    let app = spawn_app().await;
    let mut plain = app.subscribe(from_beginning()).await.unwrap();
    let open = ConsumeOpen {
        max_in_flight: 8,
        ..open_request("split")
    };
    let mut a = join(&app, open.clone()).await.unwrap();
    let mut b = join(&app, open).await.unwrap();
    post_events(&app, "u", 0..200).await;

    let mut seen: BTreeMap<u64, char> = BTreeMap::new();
    let mut per_member = [0usize; 2];
    while seen.len() < 200 {
        // Whichever member has a delivery ready; each acks what it gets.
        let (name, delivery) = tokio::select! {
            d = a.next() => ('a', d.unwrap()),
            d = b.next() => ('b', d.unwrap()),
        };
        assert_eq!(
            delivery.attempt, 1,
            "nothing fails, so nothing is redelivered"
        );
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
        "both members worked: {per_member:?}"
    );
    a.assert_quiet().await;
    b.assert_quiet().await;
    let all = take(&mut plain, 200).await;
    assert_eq!(all.len(), 200);
}

#[tokio::test]
async fn a_dead_members_deliveries_go_to_the_other_with_a_higher_attempt() {
    let app = spawn_app_with(&["--store", "memory"]).await;
    let open = ConsumeOpen {
        max_in_flight: 5,
        ..open_request("failover")
    };
    let mut doomed = join(&app, open.clone()).await.unwrap();
    post_events(&app, "u", 0..5).await;
    let held: BTreeSet<u64> = doomed.take(5).await.iter().map(seq).collect();
    let mut survivor = join(&app, open).await.unwrap();
    survivor.assert_quiet().await;
    drop(doomed);
    let redelivered = survivor.take(5).await;
    assert_eq!(redelivered.iter().map(seq).collect::<BTreeSet<_>>(), held);
    assert!(
        redelivered.iter().all(|d| d.attempt >= 2),
        "{redelivered:?}"
    );
}

#[tokio::test]
async fn an_unacked_delivery_comes_back_after_ack_wait() {
    on_each_local_store(async |app| {
        ack_wait_redelivers_and_acked_never_returns(app, Duration::from_millis(400)).await;
    })
    .await;
}

#[tokio::test]
async fn nak_redelivers_and_term_never_does() {
    on_each_local_store(async |app| {
        let (mut member, naked) = support::consume::nak_redelivers_and_term_never_does(app).await;
        member.ack(vec![naked]).await;
        member.assert_quiet().await;
    })
    .await;
}

#[tokio::test]
async fn max_in_flight_caps_deliveries_exactly() {
    on_each_local_store(support::consume::max_in_flight_caps_deliveries_exactly).await;
}

#[tokio::test]
async fn a_later_open_with_another_filter_is_a_failed_precondition() {
    let app = spawn_app_with(&["--store", "memory"]).await;
    another_definition_is_a_failed_precondition(&app, &app).await;
}

#[tokio::test]
async fn the_protocol_is_open_first_and_once() {
    let app = spawn_app_with(&["--store", "memory"]).await;
    let status = consume_with(
        app.grpc_client().await,
        request(consume_request::Request::Ack(Ack { sequences: vec![1] })),
    )
    .await
    .err()
    .expect("ack before open is refused");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let bad_name = join(&app, open_request("no spaces")).await.err().unwrap();
    assert_eq!(bad_name.code(), Code::InvalidArgument);
    let negative = join(
        &app,
        ConsumeOpen {
            ack_wait: Some(prost_types::Duration {
                seconds: -1,
                nanos: 0,
            }),
            ..open_request("g")
        },
    )
    .await
    .err()
    .unwrap();
    assert_eq!(negative.code(), Code::InvalidArgument);
    let mut member = join(&app, open_request("g")).await.unwrap();
    member
        .send(consume_request::Request::Open(open_request("g")))
        .await;
    let status = member.end().await;
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("open"), "{}", status.message());
}

#[tokio::test]
async fn per_user_ordering_keeps_each_users_events_in_order_and_one_at_a_time() {
    let app = spawn_app_with(&["--store", "memory"]).await;
    let open = ConsumeOpen {
        ordering: ConsumeOrdering::PerUser as i32,
        max_in_flight: 10,
        ..open_request("ordered")
    };
    let mut a = join(&app, open.clone()).await.unwrap();
    let mut b = join(&app, open).await.unwrap();
    // Three users interleaved: u0, u1, u2, u0, u1, u2, ...
    for n in 0..30 {
        let user = format!("u{}", n % 3);
        post_events(&app, &user, n..n + 1).await;
    }
    // Each round the group can hand out exactly one event per user (three), whichever
    // member takes them; nothing more until they are acked.
    let mut order: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for round in 0..10 {
        let mut held: BTreeMap<String, (char, u64)> = BTreeMap::new();
        while held.len() < 3 {
            let (name, delivery) = tokio::select! {
                d = a.next() => ('a', d.unwrap()),
                d = b.next() => ('b', d.unwrap()),
            };
            let event = delivery.event.unwrap();
            let user = event.application_user_id;
            if let Some(previous) = held.insert(user.clone(), (name, event.sequence)) {
                panic!(
                    "round {round}: {user} has two in flight: {previous:?} and {}",
                    event.sequence
                );
            }
            order.entry(user).or_default().push(event.sequence);
        }
        a.assert_quiet().await;
        b.assert_quiet().await;
        for (name, sequence) in held.into_values() {
            let member = if name == 'a' { &a } else { &b };
            member.ack(vec![sequence]).await;
        }
    }
    for (user, sequences) in &order {
        assert_eq!(sequences.len(), 10, "{user}");
        assert!(sequences.is_sorted(), "{user}: {sequences:?}");
    }
}

#[tokio::test]
async fn consume_needs_a_grpc_token() {
    let app = spawn_app_with(&["--store", "memory", "--grpc-tokens", "secret-token"]).await;
    let status = join(&app, open_request("g")).await.err().unwrap();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
}

#[tokio::test]
async fn shutdown_ends_members_with_unavailable() {
    let mut app = spawn_app_with(&["--store", "memory"]).await;
    let mut member = join(&app, open_request("g")).await.unwrap();
    let stopping = tokio::spawn(async move {
        app.stop().await;
    });
    let status = member.end().await;
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    tokio::time::timeout(Duration::from_secs(10), stopping)
        .await
        .expect("the app stops")
        .unwrap();
}

/// `acked_through` of `group` as the store saved it, if it saved the group.
async fn saved_acked_through(app: &TestApp, group: &str) -> Option<u64> {
    use spike_gateway::events::groups::{Group, Limits};
    let local = app.log.clone().backend().local()?;
    let snapshots = local.load_consumer_groups().await.ok()?;
    snapshots
        .iter()
        .filter_map(|s| Group::restore(s, Limits::default()).ok())
        .find(|g| g.name().as_str() == group)
        .map(|g| g.acked_through())
}

#[tokio::test]
async fn after_a_clean_stop_acked_events_never_come_back_and_the_rest_do() {
    let data_dir = std::sync::Arc::new(tempfile::tempdir().unwrap());
    let mut app = spawn_app_in(data_dir.clone(), &[]).await;
    let mut member = join(&app, open_request("durable")).await.unwrap();
    post_events(&app, "u", 0..10).await;
    let got = member.take(10).await;
    assert_eq!(
        got.iter().map(seq).collect::<Vec<_>>(),
        (1..=10).collect::<Vec<_>>()
    );
    member.ack((1..=6).collect()).await;
    eventually(
        Duration::from_secs(5),
        "the group's acks are saved",
        async || (saved_acked_through(&app, "durable").await == Some(6)).then_some(()),
    )
    .await;
    app.stop().await;
    drop(app);
    assert_eq!(member.end().await.code(), Code::Unavailable);

    let app = spawn_app_in(data_dir, &[]).await;
    // The start is ignored for an existing group: it resumes where it was.
    let mut member = join(
        &app,
        ConsumeOpen {
            start: None,
            ..open_request("durable")
        },
    )
    .await
    .unwrap();
    let again = member.take(4).await;
    assert_eq!(again.iter().map(seq).collect::<Vec<_>>(), vec![7, 8, 9, 10]);
    assert!(again.iter().all(|d| d.attempt == 2), "{again:?}");
    member.assert_quiet().await;
}

/// The real binary on `data_dir` (embedded store), with the admin token.
fn start_binary(data_dir: &std::path::Path) -> real_binary::Gateway {
    let mut command = real_binary::command(data_dir, KEY);
    command.env("GATEWAY_ADMIN_TOKENS", support::admin::ADMIN_TOKEN);
    real_binary::start(command).unwrap_or_else(|log| panic!("the gateway refused to start:\n{log}"))
}

async fn join_binary(gateway: &real_binary::Gateway, open: ConsumeOpen) -> TestMember {
    let client = EventStreamClient::new(gateway.channel().await);
    consume_with(client, request(consume_request::Request::Open(open)))
        .await
        .expect("the member joins")
}

async fn post_to_binary(gateway: &real_binary::Gateway, user: &str, range: std::ops::Range<u64>) {
    for n in range {
        assert_eq!(
            gateway.post_json(KEY, MAIN, &record_change(user, n)).await,
            200
        );
    }
}

/// The group's row as `ListConsumerGroups` shows it on the real binary.
async fn binary_row(
    gateway: &real_binary::Gateway,
    group: &str,
) -> Option<spike_gateway::proto::ConsumerGroupInfo> {
    use spike_gateway::proto::{ListConsumerGroupsRequest, admin_client::AdminClient};
    let mut admin = AdminClient::new(gateway.channel().await);
    let rows = admin
        .list_consumer_groups(support::admin::authed(ListConsumerGroupsRequest {}))
        .await
        .ok()?
        .into_inner()
        .groups;
    rows.into_iter().find(|g| g.group == group)
}

/// Takes deliveries, acking each, until every sequence of `want` came; fails on a
/// sequence delivered twice. Returns every sequence received.
async fn drain_acking(
    member: &mut TestMember,
    want: std::ops::RangeInclusive<u64>,
) -> BTreeSet<u64> {
    let mut got = BTreeSet::new();
    while !want.clone().all(|s| got.contains(&s)) {
        let delivery = member.next().await.expect("a delivery");
        assert!(
            got.insert(seq(&delivery)),
            "{} delivered twice",
            seq(&delivery)
        );
        member.ack(vec![seq(&delivery)]).await;
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_sigterm_acked_events_never_come_back_and_the_rest_do() {
    let dir = tempfile::tempdir().unwrap();
    let mut gateway = start_binary(dir.path());
    let mut member = join_binary(&gateway, open_request("graceful")).await;
    post_to_binary(&gateway, "u", 0..20).await;
    let got = member.take(20).await;
    assert_eq!(
        got.iter().map(seq).collect::<Vec<_>>(),
        (1..=20).collect::<Vec<_>>()
    );
    member.ack((1..=10).collect()).await;
    // Applied (not necessarily saved: the shutdown saves what the batch has not).
    eventually(Duration::from_secs(5), "the acks are applied", async || {
        binary_row(&gateway, "graceful")
            .await
            .filter(|g| g.acked_through == 10)
    })
    .await;
    let exit = gateway.terminate(Duration::from_secs(15));
    assert!(exit.success(), "{exit}");
    assert_eq!(member.end().await.code(), Code::Unavailable);

    let gateway = start_binary(dir.path());
    let mut member = join_binary(
        &gateway,
        ConsumeOpen {
            start: None,
            ..open_request("graceful")
        },
    )
    .await;
    let again = drain_acking(&mut member, 11..=20).await;
    assert_eq!(
        again,
        (11..=20).collect(),
        "after a clean stop no acked event returns"
    );
    member.assert_quiet().await;
}

/// A crash (SIGKILL of the real binary) loses at most the acks of the last persistence
/// interval ([`SAVE_EVERY`]): those come back, acks older than that never do, and no
/// unacked event is skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_sigkill_only_the_last_intervals_acks_return_and_no_unacked_event_is_skipped() {
    use spike_gateway::events::consumers::SAVE_EVERY;
    let dir = tempfile::tempdir().unwrap();
    let gateway = start_binary(dir.path());
    let mut member = join_binary(&gateway, open_request("crash")).await;
    post_to_binary(&gateway, "u", 0..20).await;
    let got = member.take(20).await;
    assert_eq!(
        got.iter().map(seq).collect::<Vec<_>>(),
        (1..=20).collect::<Vec<_>>()
    );
    // Acks 1..=5 applied, then longer than an interval (with room for a slow disk)
    // before the crash: the time is the condition here, so this wait is the test.
    member.ack((1..=5).collect()).await;
    eventually(Duration::from_secs(5), "the acks are applied", async || {
        binary_row(&gateway, "crash")
            .await
            .filter(|g| g.acked_through == 5)
    })
    .await;
    tokio::time::sleep(SAVE_EVERY * 2 + Duration::from_millis(500)).await;
    // Acks 6..=10 in the last interval, then the crash.
    member.ack((6..=10).collect()).await;
    drop(gateway); // SIGKILL

    let gateway = start_binary(dir.path());
    let mut member = join_binary(&gateway, open_request("crash")).await;
    // At least once: acks of the last interval may be redelivered, the unacked must be.
    // (Attempts made after the last save are not known after a crash, so an attempt
    // may start at 1 again.)
    let again = drain_acking(&mut member, 11..=20).await;
    assert!(again.iter().all(|s| (6..=20).contains(s)), "{again:?}");
    member.assert_quiet().await;
}

mod admin_calls {
    use super::*;
    use spike_gateway::proto::ListConsumerGroupsRequest;
    use support::admin::{ADMIN_TOKEN, admin, delete_group, erase_user, list_groups, seek_group};

    #[tokio::test]
    async fn list_seek_and_delete() {
        let app = spawn_app_with(&["--store", "memory", "--admin-tokens", ADMIN_TOKEN]).await;
        let mut member = join(&app, open_request("ops")).await.unwrap();
        post_events(&app, "u", 0..5).await;
        member.take(5).await;
        member.ack(vec![1, 2]).await;
        let row = eventually(Duration::from_secs(5), "the acks are applied", async || {
            list_groups(&app)
                .await
                .into_iter()
                .find(|g| g.acked_through == 2)
        })
        .await;
        assert_eq!(
            (row.group.as_str(), row.in_flight, row.pending, row.members),
            ("ops", 3, 3, 1)
        );
        assert_eq!(row.ack_wait.unwrap().seconds, 30);

        assert_eq!(seek_group(&app, "ops", 3).await, 4);
        let again = member.take(2).await;
        assert_eq!(again.iter().map(seq).collect::<Vec<_>>(), vec![4, 5]);

        let deleted = delete_group(&app, "ops").await.unwrap();
        assert_eq!(deleted.members_ended, 1);
        assert_eq!(member.end().await.code(), Code::FailedPrecondition);
        assert!(list_groups(&app).await.is_empty());
        let missing = delete_group(&app, "ops").await.unwrap_err();
        assert_eq!(missing.code(), Code::NotFound);
        // A later open creates it anew, at its own start.
        let mut fresh = join(&app, open_request("ops")).await.unwrap();
        assert_eq!(seq(&fresh.next().await.unwrap()), 1);
    }

    /// A member's answers arrive in a burst of separate messages (the gateway takes the
    /// acks already received as one batch): every ack counts once, and the nak and the
    /// term in between keep their place.
    #[tokio::test]
    async fn a_burst_of_answers_is_applied_in_order_every_ack_once() {
        let app = spawn_app_with(&["--store", "memory", "--admin-tokens", ADMIN_TOKEN]).await;
        let mut member = join(&app, open_request("burst")).await.unwrap();
        post_events(&app, "u", 0..30).await;
        member.take(30).await;
        for sequence in 1..=20 {
            let answer = match sequence {
                10 => consume_request::Request::Nak(Nak {
                    sequences: vec![10],
                    delay: None,
                }),
                15 => consume_request::Request::Term(Term {
                    sequences: vec![15],
                    reason: "poison".into(),
                }),
                // Acked twice: the second is for a sequence no longer in flight, ignored.
                s if s % 7 == 0 => consume_request::Request::Ack(Ack {
                    sequences: vec![s, s],
                }),
                s => consume_request::Request::Ack(Ack { sequences: vec![s] }),
            };
            member.send(answer).await;
        }
        let again = member.next().await.unwrap();
        assert_eq!(
            (seq(&again), again.attempt),
            (10, 2),
            "only the nak comes back"
        );
        member.assert_quiet().await;
        // In flight: 10 again and 21..=30; the acks after the nak may still be applying.
        let row = eventually(Duration::from_secs(5), "every ack is applied", async || {
            list_groups(&app)
                .await
                .into_iter()
                .find(|g| g.in_flight == 11)
        })
        .await;
        assert_eq!(
            (
                row.acked_through,
                row.pending,
                row.terminated,
                row.redeliveries
            ),
            (9, 11, 1, 1),
            "{row:?}"
        );
    }

    #[tokio::test]
    async fn events_retention_removed_before_they_were_settled_are_skipped_and_counted() {
        let app = spawn_app_with(&[
            "--store",
            "memory",
            "--memory-capacity",
            "10",
            "--admin-tokens",
            ADMIN_TOKEN,
        ])
        .await;
        let open = ConsumeOpen {
            max_in_flight: 2,
            ..open_request("aged")
        };
        let mut member = join(&app, open).await.unwrap();
        post_events(&app, "u", 0..3).await;
        let first = member.take(2).await;
        assert_eq!(first.iter().map(seq).collect::<Vec<_>>(), vec![1, 2]);
        // 1 waits an hour for its redelivery; 2 and 3 end up in flight, so the member has
        // no room and the group reads nothing while retention removes 1 to 8.
        member
            .send(consume_request::Request::Nak(Nak {
                sequences: vec![1],
                delay: Some(prost_types::Duration {
                    seconds: 3600,
                    nanos: 0,
                }),
            }))
            .await;
        assert_eq!(seq(&member.next().await.unwrap()), 3);
        post_events(&app, "u", 3..18).await;

        // Room again: the group reads on, past the removed events, to the oldest retained.
        member.ack(vec![2]).await;
        assert_eq!(seq(&member.next().await.unwrap()), 9);
        // 3 comes back, but it is gone: skipped, and the next ones go out instead.
        member
            .send(consume_request::Request::Nak(Nak {
                sequences: vec![3],
                delay: None,
            }))
            .await;
        let next = member.next().await.unwrap();
        assert_eq!((seq(&next), next.attempt), (10, 1));
        member.assert_quiet().await;
        // Expired: 1 (waiting), 3 (in flight, back after the nak), 4 to 8 (never read).
        let row = eventually(
            Duration::from_secs(5),
            "the skips are counted",
            async || list_groups(&app).await.into_iter().find(|g| g.expired == 7),
        )
        .await;
        // 9 to 18 are retained and unacked (9 and 10 in flight).
        assert_eq!((row.pending, row.in_flight, row.acked_through), (10, 2, 8));
    }

    #[tokio::test]
    async fn the_group_rpcs_need_an_admin_token() {
        let app = spawn_app_with(&["--store", "memory", "--admin-tokens", ADMIN_TOKEN]).await;
        let status = admin(&app)
            .await
            .list_consumer_groups(ListConsumerGroupsRequest {})
            .await
            .unwrap_err();
        assert_eq!(status.code(), Code::Unauthenticated);
    }

    #[tokio::test]
    async fn erasure_removes_the_users_events_from_the_groups_work() {
        let app = spawn_app_with(&["--admin-tokens", ADMIN_TOKEN]).await;
        let member = a_member_holds_an_event_of_a_user_erased_meanwhile(&app).await;
        // At once: only "kept"'s event is pending; the held one is on the member's count.
        let row = list_groups(&app).await.pop().unwrap();
        assert_eq!((row.pending, row.in_flight), (1, 0), "{row:?}");
        erasure_leaves_only_the_other_users_work(&app, member).await;
    }

    /// A group far behind reads its next page while it delivers one: an erasure reaches
    /// the page read ahead too, not only the one being delivered.
    #[tokio::test]
    async fn erasure_reaches_the_page_a_group_read_ahead() {
        let app = spawn_app_with(&["--admin-tokens", ADMIN_TOKEN]).await;
        // More than two pages (256 events each) behind: "gone"'s first events are on the
        // second page, which is read ahead as the first one goes out.
        post_events(&app, "kept", 0..300).await;
        post_events(&app, "gone", 300..600).await;
        let open = ConsumeOpen {
            max_in_flight: 1,
            ..open_request("ahead")
        };
        let mut member = join(&app, open).await.unwrap();
        let mut first = Some(member.next().await.unwrap());
        erase_user(&app, "gone").await;
        for expected in 1..=300 {
            let delivery = match first.take() {
                Some(delivery) => delivery,
                None => member.next().await.unwrap(),
            };
            let event = delivery.event.unwrap();
            assert_eq!(
                (event.sequence, event.application_user_id.as_str()),
                (expected, "kept")
            );
            member.ack(vec![expected]).await;
        }
        member.assert_quiet().await;
    }
}

#[tokio::test]
async fn max_in_flight_over_the_configured_limit_is_refused() {
    let app = spawn_app_with(&["--store", "memory", "--group-max-in-flight", "8"]).await;
    let status = join(
        &app,
        ConsumeOpen {
            max_in_flight: 9,
            ..open_request("g")
        },
    )
    .await
    .err()
    .unwrap();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(
        status.message().contains("limit of 8"),
        "{}",
        status.message()
    );
    let too_long = join(
        &app,
        ConsumeOpen {
            ack_wait: Some(prost_types::Duration {
                seconds: 25 * 3600,
                nanos: 0,
            }),
            ..open_request("g")
        },
    )
    .await
    .err()
    .unwrap();
    assert_eq!(too_long.code(), Code::InvalidArgument);
    // The default (64) is capped by the lower limit, so a 0 still joins.
    join(&app, open_request("g")).await.unwrap();
}
