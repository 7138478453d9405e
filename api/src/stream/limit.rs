//! Open event streams per user, counted in this process: a tier's `concurrent_streams`
//! bounds what one user can hold open on one replica. The count drops when a stream
//! ends, or when the server notices its client has gone — at its next write, an event
//! or a heartbeat (the permit is dropped with the stream).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use common::metrics::InFlight;
use uuid::Uuid;

#[derive(Default)]
pub struct StreamCounter {
    open: Mutex<HashMap<Uuid, usize>>,
}

/// One open stream; dropping it frees the slot.
pub struct StreamPermit {
    counter: Arc<StreamCounter>,
    user_id: Uuid,
    /// Counts the stream in `ultra_sse_subscribers` while it is open.
    _gauge: InFlight,
}

impl StreamCounter {
    /// A permit if `user_id` has fewer than `limit` streams open.
    pub fn acquire(self: &Arc<Self>, user_id: Uuid, limit: u32) -> Option<StreamPermit> {
        let mut open = self.open.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let count = open.entry(user_id).or_default();
        if *count >= limit as usize {
            return None;
        }
        *count += 1;
        let gauge = InFlight::enter(metrics::gauge!(common::metrics::SSE_SUBSCRIBERS));
        Some(StreamPermit { counter: self.clone(), user_id, _gauge: gauge })
    }
}

impl Drop for StreamPermit {
    fn drop(&mut self) {
        let mut open = self.counter.open.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(count) = open.get_mut(&self.user_id) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                open.remove(&self.user_id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permits_are_counted_per_user_and_freed_on_drop() {
        let counter = Arc::new(StreamCounter::default());
        let user = Uuid::now_v7();
        let first = counter.acquire(user, 2).expect("first");
        let _second = counter.acquire(user, 2).expect("second");
        assert!(counter.acquire(user, 2).is_none());
        assert!(counter.acquire(Uuid::now_v7(), 2).is_some(), "other users are unaffected");
        drop(first);
        assert!(counter.acquire(user, 2).is_some());
    }
}
