//! Graceful shutdown that ends as soon as it can. On SIGTERM pingora closes the listeners and
//! then sleeps the whole grace period, however idle the server is. berth counts the requests
//! it is answering ([`InFlight`]); [`Drain`] exits the process once none is left, or lets
//! pingora cut them at the end of `shutdown_grace`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;

use super::access_log::AccessLog;

/// How often a draining server looks at its request count.
const DRAIN_POLL: Duration = Duration::from_millis(20);

/// The number of requests being answered right now.
#[derive(Clone, Default)]
pub struct InFlight(Arc<AtomicUsize>);

/// One request being answered; dropped when it is done.
pub struct Request(Arc<AtomicUsize>);

impl InFlight {
    pub fn enter(&self) -> Request {
        self.0.fetch_add(1, Ordering::SeqCst);
        Request(self.0.clone())
    }

    pub fn count(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

impl Drop for Request {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Background task: after the shutdown signal, exits once no request is in flight.
pub struct Drain {
    pub in_flight: InFlight,
    pub grace: Duration,
    /// Flushed before exiting: it may hold the lines of the last requests.
    pub access_log: AccessLog,
}

#[async_trait]
impl BackgroundService for Drain {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        if shutdown.changed().await.is_err() {
            return;
        }
        let deadline = tokio::time::Instant::now() + self.grace;
        loop {
            let left = self.in_flight.count();
            if left == 0 {
                log::info!("shutdown: no request in flight, exiting");
                self.access_log.flush();
                std::process::exit(0);
            }
            if tokio::time::Instant::now() >= deadline {
                // pingora's grace period ends now too; it cuts what is left.
                log::warn!("shutdown: {left} requests still running after the grace period");
                return;
            }
            tokio::time::sleep(DRAIN_POLL).await;
        }
    }
}
