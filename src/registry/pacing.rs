//! Bulk byte loops (upload bodies, proxied blob GETs) hand the worker back at short intervals,
//! so that metadata requests on the same runtime keep their latency while bytes flow.
//!
//! A loop whose socket always has data would otherwise run until tokio's cooperative budget
//! runs out (128 reads, megabytes of hashing and copying) before the worker looks at other
//! tasks, and it polls for new I/O only every 61 task polls. `yield_now` defers the task until
//! the worker has run what is ready and polled for I/O, so a manifest GET that just arrived is
//! answered within one slice of every busy transfer.

/// Bytes a transfer moves between two yields (a fraction of a millisecond of hashing/copying).
const SLICE: usize = 256 * 1024;

#[derive(Default)]
pub struct Pacer {
    since_yield: usize,
}

impl Pacer {
    /// Call after moving `n` bytes; yields once a slice's worth has gone through.
    pub async fn moved(&mut self, n: usize) {
        self.since_yield += n;
        if self.since_yield >= SLICE {
            self.since_yield = 0;
            tokio::task::yield_now().await;
        }
    }
}
