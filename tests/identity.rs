//! Event identity (SPEC §2.4), pinned: the literal ids of every sample, so that a refactor
//! cannot silently turn Spike's redeliveries into new events.

use prost_types::Timestamp;
use spike_gateway::{
    proto::WebhookCategory,
    wire::{Normalized, normalize, split},
};

fn fixture(name: &str) -> Vec<u8> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("fixture {}: {e}", path.display()))
}

/// Every event of a sample, posted on the path its file name says.
fn normalized(name: &str) -> Vec<Normalized> {
    let path = if name.starts_with("main-") {
        WebhookCategory::Main
    } else if name.starts_with("lab-report-") {
        WebhookCategory::LabReports
    } else {
        WebhookCategory::NutritionRecords
    };
    let body = fixture(name);
    split(&body)
        .unwrap()
        .into_iter()
        .map(|raw| normalize(raw, path, Timestamp::default()).expect("usable"))
        .collect()
}

/// The ids the 0.1 release stored for the samples (all found in
/// tests/fixtures/legacy-0.1-data/events.redb). Never change these: they are what
/// a data directory written by 0.1 holds.
const LEGACY_IDS: [(&str, &[&str]); 10] = [
    (
        "lab-report-completed.json",
        &["lab-989b62d1b48340ab560aff1ce5cb5509"],
    ),
    (
        "lab-report-enveloped.json",
        &["lab-json-5da12f80bd40f2576de28fc16528cd86"],
    ),
    (
        "lab-report-failed.json",
        &["lab-010634a0395fa75916091258842740c3"],
    ),
    (
        "main-batch.json",
        &[
            "main-a4fc18ddb2c964c793b72cb06807b0e1",
            "main-c82a69bba0572973fe2ba8faf0fb4595",
        ],
    ),
    (
        "main-provider-integration-created.json",
        &["main-5b367f17e8bb5c99897d885d30fd0a88"],
    ),
    (
        "main-provider-integration-deleted.json",
        &["main-bfb4561e808104df65a4a065a3156b8a"],
    ),
    (
        "main-record-change.json",
        &["main-1edf44f8f120615c7a4ea5b6559b4144"],
    ),
    (
        "nutrition-completed.json",
        &["nutrition-31ed7624a31ae0ba10a66b2f66bfd477"],
    ),
    (
        "nutrition-enveloped.json",
        &["nutrition-json-aff34d42f0ef28860be27163aba19a9e"],
    ),
    (
        "nutrition-failed.json",
        &["nutrition-5aa37365a25461ff314b9c7beffffada"],
    ),
];

#[test]
fn the_legacy_id_of_every_sample_is_the_one_0_1_stored() {
    for (name, expected) in LEGACY_IDS {
        let ids: Vec<String> = normalized(name)
            .into_iter()
            .map(|n| n.legacy_event_id)
            .collect();
        assert_eq!(ids, expected, "{name}");
    }
}
