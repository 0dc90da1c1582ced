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
//! When the budget is spent a writer waits, and while it waits it does not read its request
//! body: TCP flow control slows its client down. Waiters are served in arrival order (tokio's
//! semaphore is FIFO, a large request at the head is not overtaken), so no upload starves.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::metrics::UPLOADS;

/// Budget is counted in KiB so that one grant of up to a 5 GiB part fits a semaphore request.
const UNIT: u64 = 1024;

pub struct UploadBudget {
    permits: Arc<Semaphore>,
}

impl UploadBudget {
    /// A budget of `bytes` (rounded down to whole KiB).
    pub fn new(bytes: u64) -> Self {
        let units = (bytes / UNIT).min(Semaphore::MAX_PERMITS as u64) as usize;
        UPLOADS.budget_bytes.set((units as u64 * UNIT) as i64);
        UploadBudget {
            permits: Arc::new(Semaphore::new(units)),
        }
    }

    /// Room for a buffer of `bytes`, waiting in line until it is free. `bytes` must not exceed
    /// the budget (configuration checks that it is at least one part).
    pub async fn acquire(&self, bytes: u64) -> BudgetGrant {
        let units = bytes.div_ceil(UNIT) as u32;
        let permit = match self.permits.clone().try_acquire_many_owned(units) {
            Ok(p) => p,
            Err(_) => {
                UPLOADS.budget_waiting.inc();
                let _waiting = Waiting;
                let start = Instant::now();
                let p = self
                    .permits
                    .clone()
                    .acquire_many_owned(units)
                    .await
                    .expect("the budget semaphore is never closed");
                UPLOADS.budget_wait.observe(start.elapsed().as_secs_f64());
                p
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

/// Counts a waiter out again however its wait ends (granted, or the request dropped).
struct Waiting;

impl Drop for Waiting {
    fn drop(&mut self) {
        UPLOADS.budget_waiting.dec();
    }
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
