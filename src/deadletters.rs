//! Dead letters above storage: the one conversion of a parsed body into an append batch
//! (shared by the webhook front and redrive), redrive, and the backfill of user ids into
//! letters stored by the 0.1 release.
//!
//! Storage never parses JSON: whatever needs Spike's JSON read (the items of a letter,
//! the users it names) is read here through [`crate::wire`], and storage gets the result.

use std::sync::Arc;

use prost_types::Timestamp;

use crate::{
    events::{Admission, Admitted, AppendOutcome, EventLog, LogError, NewEvent},
    metrics::Metrics,
    proto::{DeadLetter, WebhookCategory},
    wire::{self, LegacyIds, ParsedBody, Reason, Rejected},
};

/// Letters read, parsed and committed together by a redrive or the backfill: one atomic
/// append per batch bounds its memory and transaction size.
const BATCH: usize = 100;

/// A request's items as the log takes them.
#[derive(Debug, Default)]
pub struct Batch {
    pub events: Vec<NewEvent>,
    /// Each new letter with the closed reason it was refused for (a metrics label).
    pub dead_letters: Vec<(Reason, DeadLetter)>,
}

impl Batch {
    /// The append of a webhook request: its events and letters, one atomic commit.
    pub fn into_admission(self) -> Admission {
        Admission {
            events: self.events,
            dead_letters: self.dead_letters.into_iter().map(|(_, l)| l).collect(),
            ..Admission::default()
        }
    }
}

/// Whether items bound for `log` need their 0.1 id: only while it may still index ids of
/// that rule.
pub fn legacy_ids(log: &dyn EventLog) -> LegacyIds {
    if log.wants_legacy_ids() {
        LegacyIds::Compute
    } else {
        LegacyIds::Skip
    }
}

/// The one conversion of a parsed body into what the log stores.
pub fn batch(parsed: ParsedBody, path: WebhookCategory, received_at: Timestamp) -> Batch {
    let events = parsed
        .events
        .into_iter()
        .map(|normalized| {
            if normalized.reclassified {
                tracing::info!(
                    content = WebhookCategory::try_from(normalized.event.category)
                        .map_or("?", |c| c.as_str_name()),
                    "item classified by its content, not its path"
                );
            }
            if !normalized.event.unparsed_fields.is_empty() {
                // The count only: paths may carry payload keys.
                tracing::debug!(
                    unparsed_fields = normalized.event.unparsed_fields.len(),
                    "item kept with fields left unset"
                );
            }
            let legacy_event_id = normalized
                .legacy_event_id
                .filter(|legacy| *legacy != normalized.event.event_id);
            NewEvent {
                event: normalized.event,
                legacy_event_id,
            }
        })
        .collect();
    let dead_letters = parsed
        .rejected
        .into_iter()
        .map(|rejected| {
            tracing::warn!(reason = %rejected.unusable, "signed item kept as a dead letter");
            (
                rejected.unusable.reason,
                letter(rejected, path, received_at),
            )
        })
        .collect();
    Batch {
        events,
        dead_letters,
    }
}

fn letter(rejected: Rejected, path: WebhookCategory, received_at: Timestamp) -> DeadLetter {
    DeadLetter {
        whole_body: rejected.unusable.reason == Reason::Merged,
        id: 0,
        received_at: Some(received_at),
        path_category: path as i32,
        reason: rejected.unusable.detail,
        raw_json: rejected.raw_json.to_vec(),
        application_user_ids: rejected.application_user_ids,
    }
}

/// Which letters to redrive.
#[derive(Debug, Clone)]
pub enum Selection {
    Ids(Vec<u64>),
    All,
}

/// What a redrive did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Redriven {
    pub appended: u64,
    pub duplicates: u64,
    pub still_dead: u64,
}

/// Re-reads the selected letters with today's code and commits, batch by batch, what now
/// becomes events together with the removal of their letters.
pub async fn redrive(log: &dyn EventLog, selection: Selection) -> Result<Redriven, LogError> {
    let mut total = Redriven::default();
    match selection {
        Selection::Ids(mut ids) => {
            ids.sort_unstable();
            ids.dedup();
            for chunk in ids.chunks(BATCH) {
                let letters = letters_by_id(log, chunk).await?;
                redrive_batch(log, letters, &mut total).await?;
            }
        }
        Selection::All => {
            // Only the letters stored when the redrive starts. What it stores itself comes
            // after them and was just read: the still-dead items of a merged letter, and on
            // NATS a letter rewritten with its current reason (republished under a new id),
            // which would otherwise be read, and counted as still dead, twice.
            let Some(last) = last_letter_id(log).await? else {
                return Ok(total);
            };
            let mut after = 0;
            while after < last {
                let page = log.dead_letters(after, BATCH, None).await?;
                let Some(tail) = page.last() else { break };
                after = tail.id;
                let letters: Vec<DeadLetter> = page.into_iter().filter(|l| l.id <= last).collect();
                redrive_batch(log, letters, &mut total).await?;
            }
        }
    }
    Ok(total)
}

/// The largest id stored now, if any letter is.
async fn last_letter_id(log: &dyn EventLog) -> Result<Option<u64>, LogError> {
    let mut last = None;
    loop {
        let page = log.dead_letters(last.unwrap_or(0), BATCH, None).await?;
        match page.last() {
            Some(letter) => last = Some(letter.id),
            None => return Ok(last),
        }
    }
}

async fn letters_by_id(log: &dyn EventLog, ids: &[u64]) -> Result<Vec<DeadLetter>, LogError> {
    let mut letters = Vec::with_capacity(ids.len());
    for &id in ids {
        let found = log.dead_letters(id.saturating_sub(1), 1, None).await?;
        letters.extend(found.into_iter().filter(|l| l.id == id));
    }
    Ok(letters)
}

async fn redrive_batch(
    log: &dyn EventLog,
    letters: Vec<DeadLetter>,
    total: &mut Redriven,
) -> Result<Admitted, LogError> {
    let mut admission = Admission::default();
    let legacy = legacy_ids(log);
    for letter in letters {
        total.still_dead += reread(letter, legacy, &mut admission);
    }
    let admitted = log.admit(admission).await?;
    for outcome in &admitted.events {
        match outcome {
            AppendOutcome::Appended { .. } => total.appended += 1,
            AppendOutcome::Duplicate { .. } => total.duplicates += 1,
        }
    }
    Ok(admitted)
}

/// Adds to `admission` what re-reading `letter` gives; returns how many letters it leaves.
///
/// A rejected item with the letter's own bytes is the letter itself, still dead: it stays
/// (rewritten only if its reason changed). Other rejected items (of a merged letter that
/// now partly parses) become letters of their own. If the letter itself is not among the
/// rejected, it is resolved: removed in the same commit that appends its events.
fn reread(letter: DeadLetter, legacy: LegacyIds, admission: &mut Admission) -> u64 {
    let path = WebhookCategory::try_from(letter.path_category).unwrap_or(WebhookCategory::Main);
    let received_at = letter.received_at.unwrap_or_default();
    let Ok(parsed) = wire::parse_body(&body_of(&letter), path, received_at, legacy) else {
        // Letters hold JSON the gateway already split; should one not parse, it stays.
        return 1;
    };
    let batch = batch(parsed, path, received_at);
    admission.events.extend(batch.events);
    let mut still_dead = 0;
    let mut itself = false;
    for (_, mut item) in batch.dead_letters {
        still_dead += 1;
        if item.raw_json == letter.raw_json {
            itself = true;
            if item.reason != letter.reason
                || item.application_user_ids != letter.application_user_ids
            {
                item.id = letter.id;
                admission.updated.push(item);
            }
        } else {
            admission.dead_letters.push(item);
        }
    }
    if !itself {
        admission.resolved.push(letter.id);
    }
    still_dead
}

/// The 0.1 release's detail for a merged letter; its letters have no `whole_body` flag.
const MERGED_BY_0_1: &str = "items could not be used; the whole body is kept";

/// The body to read a letter as: a merged letter is a body already; one item is read as
/// the body `[item]`, so that an item that is itself an array stays one item.
fn body_of(letter: &DeadLetter) -> Vec<u8> {
    if letter.whole_body || letter.reason.contains(MERGED_BY_0_1) {
        return letter.raw_json.clone();
    }
    let mut body = Vec::with_capacity(letter.raw_json.len() + 2);
    body.push(b'[');
    body.extend_from_slice(&letter.raw_json);
    body.push(b']');
    body
}

/// Records the user ids of letters stored without them (by the 0.1 release), so that
/// erasure and the user filter find them. Idempotent: letters that name no user are
/// read again at the next start, and nothing is rewritten. Returns the letters updated.
pub async fn backfill_user_ids(log: &dyn EventLog) -> Result<u64, LogError> {
    let mut updated = 0;
    let mut after = 0;
    loop {
        let page = log.dead_letters(after, BATCH, None).await?;
        let Some(last) = page.last() else {
            return Ok(updated);
        };
        after = last.id;
        let missing: Vec<DeadLetter> = page
            .into_iter()
            .filter(|l| l.application_user_ids.is_empty())
            .filter_map(|mut letter| {
                letter.application_user_ids = wire::users_named_in(&letter.raw_json);
                (!letter.application_user_ids.is_empty()).then_some(letter)
            })
            .collect();
        if missing.is_empty() {
            continue;
        }
        updated += missing.len() as u64;
        log.admit(Admission {
            updated: missing,
            ..Admission::default()
        })
        .await?;
    }
}

/// Sets the `dead_letters_stored` gauge from the log (shared by every replica on NATS).
pub async fn refresh_gauge(log: &Arc<dyn EventLog>, metrics: &Metrics) {
    match log.clone().backend().dead_letter_count().await {
        Ok(count) => metrics.dead_letters_stored(count),
        Err(e) => tracing::warn!(error = %e, "cannot count dead letters for the gauge"),
    }
}
