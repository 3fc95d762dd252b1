//! spike-gateway: Spike health-data webhooks in, typed gRPC streams out.
//!
//! Module map, in the order data flows through it:
//!
//! - [`wire`]: Spike's wire model at the bottom of the crate: payload shapes,
//!   classification, the mapping to protobuf, event identity, the user ids a payload names.
//!   Everything that reads Spike's JSON goes through it.
//! - [`config`]: typed configuration from flags and the environment (SPEC §7), secrets
//!   redacted.
//! - [`webhook`]: the axum HTTP front. Verifies `X-Body-Signature` over the raw bytes,
//!   parses Spike's payload shapes at the edge (through [`wire`]), and answers 200 only once
//!   the log has made every event durable.
//! - [`events`]: the narrow [`events::EventLog`] trait with its `embedded` (redb, group
//!   commit), `memory` and `nats` (JetStream) backends; the local backends' history-and-live
//!   capability [`events::LocalLog`], live fan-out, and the subscription feeds that
//!   hand over from history to live without gaps or duplicates. Each committed event is
//!   encoded once ([`events::CommittedEvent`]) and those bytes go to every subscriber.
//!   Consumer groups: a pure state machine ([`events::groups`]) driven by one task per
//!   group ([`events::consumers`]).
//! - [`deadletters`]: above the log: the one conversion of a parsed body into an append
//!   batch (webhooks and redrive share it), dead-letter redrive, and the backfill of user
//!   ids into letters stored by 0.1. Storage itself never parses JSON.
//! - [`grpc`]: the tonic server: `EventStream/Subscribe` (with a codec that sends the
//!   pre-encoded events) and `Consume`, the `SpikeRecords` proxies, `Admin` (erasure, dead
//!   letters, consumer groups), bearer-token auth, TLS, connection and stream bounds,
//!   health and reflection.
//! - [`app`]: wiring. Binds the listeners, runs both servers, housekeeping and readiness,
//!   and shuts everything down in order within a grace deadline.
//! - [`readiness`]: the one readiness answer `/readyz` and gRPC health both follow.
//! - [`spike`]: the client for Spike's REST API (per-user auth, retries, deadlines).
//! - `net` (private): the write pass-through both fronts' socket guards share.
//! - [`metrics`]: the Prometheus registry behind `GET /metrics`.
//! - [`proto`]: code generated from `proto/spike/gateway/v1`.
//! - [`telemetry`]: tracing set-up. Payload bodies and secrets are never logged.

// Also `forbid` in Cargo.toml's `[lints]`; stated here so no module can `allow` it.
#![forbid(unsafe_code)]

pub mod app;
pub mod config;
pub mod deadletters;
pub mod events;
pub mod grpc;
pub mod metrics;
mod net;
pub mod proto;
pub mod readiness;
pub mod spike;
pub mod telemetry;
pub mod webhook;
pub mod wire;
