//! The upload buffer budget: part buffers of all uploads together stay within
//! `upload.buffer_budget`, whatever the number of clients.
//!
//! A writer is granted a whole part's worth of budget before it fills a part buffer, and the
//! grant travels with the part's bytes into its UploadPart task, ending when they are freed.
//! So a writer never waits for budget while holding budget for a part it is still filling:
//! every grant held belongs either to a buffer that fills from its own client or to a part on
//! its way to the object store, and both end without waiting for another upload. However many
//! uploads are half way through a part, none waits on another: no deadlock.
//!
//! An upload request also holds memory besides its part buffers while it reads its body:
//! pingora's 64 KiB body read buffer, the chunk in the hand-over to the transfers runtime, what
//! is left of a chunk once a part fills mid-chunk, and its connection's buffers. heaptrack at
//! 200 uploads counted 34 MiB of these (about 175 KiB a request, the hand-over chunk aside),
//! growing with the number of clients, so every request that reads an upload body first takes
//! [`REQUEST_ROOM`] from the same budget ([`UploadBudget::admit`]).
//! These charges together never exceed the budget less one part (nor a quarter of it), so a
//! part buffer always fits once the parts in flight are stored: the no-deadlock argument
//! above still holds. With a budget of a single part, requests are not charged.
//!
//! When the budget is spent a writer waits, and while it waits it does not read its request
//! body: TCP flow control slows its client down. Waiters are served in arrival order (tokio's
//! semaphore is FIFO, a large request at the head is not overtaken), so no upload starves.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::metrics::UPLOADS;

/// Budget is counted in KiB so that one grant of up to a 5 GiB part fits a semaphore request.
const UNIT: u64 = 1024;

/// What an upload request is charged for the buffers it holds while reading its body.
pub const REQUEST_ROOM: u64 = 256 * 1024;

pub struct UploadBudget {
    permits: Arc<Semaphore>,
    /// How many requests may hold a [`REQUEST_ROOM`] charge at once; None: not charged.
    requests: Option<Arc<Semaphore>>,
}

impl UploadBudget {
    /// A budget of `bytes` (rounded down to whole KiB) for parts of `part_size`.
    pub fn new(bytes: u64, part_size: u64) -> Self {
        let units = (bytes / UNIT).min(Semaphore::MAX_PERMITS as u64) as usize;
        UPLOADS.budget_bytes.set((units as u64 * UNIT) as i64);
        let for_requests = (bytes.saturating_sub(part_size)).min(bytes / 4) / REQUEST_ROOM;
        UploadBudget {
            permits: Arc::new(Semaphore::new(units)),
            requests: (for_requests > 0).then(|| {
                Arc::new(Semaphore::new(
                    for_requests.min(Semaphore::MAX_PERMITS as u64) as usize,
                ))
            }),
        }
    }

    /// Room for an upload request's own buffers, held while it reads its body.
    pub async fn admit(&self) -> Option<RequestRoom> {
        let requests = self.requests.as_ref()?;
        let slot = match requests.clone().try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                let _waiting = Waiting::start();
                requests
                    .clone()
                    .acquire_owned()
                    .await
                    .expect("the request semaphore is never closed")
            }
        };
        Some(RequestRoom {
            _grant: self.acquire(REQUEST_ROOM).await,
            _slot: slot,
        })
    }

    /// Room for a buffer of `bytes`, waiting in line until it is free. `bytes` must not exceed
    /// the budget (configuration checks that it is at least one part).
    pub async fn acquire(&self, bytes: u64) -> BudgetGrant {
        let units = bytes.div_ceil(UNIT) as u32;
        let permit = match self.permits.clone().try_acquire_many_owned(units) {
            Ok(p) => p,
            Err(_) => {
                let _waiting = Waiting::start();
                self.permits
                    .clone()
                    .acquire_many_owned(units)
                    .await
                    .expect("the budget semaphore is never closed")
            }
        };
        let bytes = units as u64 * UNIT;
        UPLOADS.budget_in_use.add(bytes as i64);
        BudgetGrant {
            _permit: permit,
            bytes,
        }
    }
}

/// Counts a waiter in, and out again however its wait ends (granted, or the request dropped),
/// and times the wait.
struct Waiting(Instant);

impl Waiting {
    fn start() -> Waiting {
        UPLOADS.budget_waiting.inc();
        Waiting(Instant::now())
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        UPLOADS.budget_waiting.dec();
        UPLOADS.budget_wait.observe(self.0.elapsed().as_secs_f64());
    }
}

/// A request's charge for its own buffers; returned on drop.
pub struct RequestRoom {
    _grant: BudgetGrant,
    _slot: OwnedSemaphorePermit,
}

/// Room for one part buffer; returned to the budget on drop, on every path.
pub struct BudgetGrant {
    _permit: OwnedSemaphorePermit,
    bytes: u64,
}

impl Drop for BudgetGrant {
    fn drop(&mut self) {
        UPLOADS.budget_in_use.sub(self.bytes as i64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const MIB: u64 = 1024 * 1024;

    #[test]
    fn request_charges_leave_room_for_a_part() {
        // A quarter of the budget, and never the last part's worth.
        let b = UploadBudget::new(256 * MIB, 8 * MIB);
        assert_eq!(
            b.requests.unwrap().available_permits() as u64,
            64 * MIB / REQUEST_ROOM
        );
        let b = UploadBudget::new(10 * MIB, 8 * MIB);
        assert_eq!(
            b.requests.unwrap().available_permits() as u64,
            2 * MIB / REQUEST_ROOM
        );
        assert!(UploadBudget::new(8 * MIB, 8 * MIB).requests.is_none());
    }

    #[tokio::test]
    async fn requests_beyond_their_share_wait_and_parts_still_fit() {
        let part = 5 * MIB;
        let b = Arc::new(UploadBudget::new(8 * MIB, part));
        let slots = (2 * MIB / REQUEST_ROOM) as usize; // 8 MiB / 4
        let mut rooms = Vec::new();
        for _ in 0..slots {
            rooms.push(b.admit().await.expect("charged"));
        }
        // One more request waits for a slot ...
        let more = tokio::spawn({
            let b = b.clone();
            async move { b.admit().await.map(|_| ()) }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!more.is_finished());
        // ... while a part buffer still gets its whole size.
        let grant = tokio::time::timeout(Duration::from_secs(1), b.acquire(part))
            .await
            .expect("a part fits beside every request charge");
        drop(grant);
        rooms.pop();
        tokio::time::timeout(Duration::from_secs(1), more)
            .await
            .expect("a freed slot admits the waiting request")
            .unwrap();
        drop(rooms);
        assert_eq!(b.permits.available_permits() as u64, 8 * MIB / UNIT);
    }
}
