//! Per-user Spike access tokens: cached, fetched once per user even under concurrency.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

/// Users whose tokens are kept at most; past it, idle entries are dropped (their next call
/// fetches a new token).
const MAX_CACHED_USERS: usize = 10_000;

/// One slot per user. The outer std `Mutex` only guards the map and is never held across an
/// await; each user's async `Mutex` is held while that user's token is fetched, so
/// concurrent calls for one user wait for the single fetch instead of starting their own.
#[derive(Default)]
pub struct TokenCache {
    users: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Option<String>>>>>,
}

impl TokenCache {
    fn slot(&self, user: &str) -> Arc<tokio::sync::Mutex<Option<String>>> {
        let mut users = self.users.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(slot) = users.get(user) {
            return slot.clone();
        }
        if users.len() >= MAX_CACHED_USERS {
            // Keep only slots some call is using right now.
            users.retain(|_, slot| Arc::strong_count(slot) > 1);
        }
        users.entry(user.to_owned()).or_default().clone()
    }

    /// The user's cached token, or the one `fetch` obtains (at most one fetch at a time).
    pub async fn get<E, F>(&self, user: &str, fetch: impl FnOnce() -> F) -> Result<String, E>
    where
        F: Future<Output = Result<String, E>>,
    {
        let slot = self.slot(user);
        let mut token = slot.lock().await;
        if let Some(token) = token.as_ref() {
            return Ok(token.clone());
        }
        let fresh = fetch().await?;
        *token = Some(fresh.clone());
        Ok(fresh)
    }

    /// Forgets `stale` if it is still the user's token (another call may have refreshed it).
    pub async fn invalidate(&self, user: &str, stale: &str) {
        let slot = self.slot(user);
        let mut token = slot.lock().await;
        if token.as_deref() == Some(stale) {
            *token = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[tokio::test]
    async fn concurrent_callers_share_one_fetch_and_invalidation_refetches() {
        let cache = Arc::new(TokenCache::default());
        let fetches = Arc::new(AtomicUsize::new(0));
        let calls = (0..20).map(|_| {
            let (cache, fetches) = (cache.clone(), fetches.clone());
            tokio::spawn(async move {
                cache
                    .get("u", || async {
                        fetches.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                        Ok::<_, ()>("t1".to_owned())
                    })
                    .await
            })
        });
        for call in calls.collect::<Vec<_>>() {
            assert_eq!(call.await.unwrap(), Ok("t1".to_owned()));
        }
        assert_eq!(fetches.load(Ordering::SeqCst), 1);

        cache.invalidate("u", "not-the-token").await;
        let again = cache
            .get("u", || async { Ok::<_, ()>("t2".to_owned()) })
            .await;
        assert_eq!(
            again,
            Ok("t1".to_owned()),
            "a stale invalidation keeps the newer token"
        );
        cache.invalidate("u", "t1").await;
        let again = cache
            .get("u", || async { Ok::<_, ()>("t2".to_owned()) })
            .await;
        assert_eq!(again, Ok("t2".to_owned()));
    }
}
