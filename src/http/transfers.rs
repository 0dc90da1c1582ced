//! Upload byte work runs on a runtime of its own, so metadata calls keep their latency while
//! bytes flow.
//!
//! On pingora's runtime, a manifest GET that arrives while uploads run waits in the same
//! worker queue as every upload's slice of hashing, buffering and part sending: with 32
//! uploads that was a p99 of 30–40× the idle one. Here the HTTP worker only reads the request
//! body, one chunk each time the upload asks for one, and hands it over; everything else an
//! upload does (sha256, part buffers, UploadPart, session saves) runs as a task on the
//! transfers runtime, whose worker threads run at a lower CPU priority (`upload.transfer_nice`,
//! 19 by default). A metadata request then waits for at most one body read per upload, not for
//! their byte work, and when the CPUs are contended the OS runs request handling first. The
//! figures are in the README (Metadata calls while bytes flow).
//!
//! Chunks are read on demand, never ahead: an upload waiting for buffer budget holds no chunk,
//! and berth stops reading its body (TCP flow control slows the client, see
//! [`crate::registry::budget`]).

use std::future::Future;
use std::sync::OnceLock;

use bytes::Bytes;
use tokio::runtime::Runtime;
use tokio::sync::mpsc;

use crate::registry::{BodySource, RegistryError, RegistryResult};

static RUNTIME: OnceLock<Runtime> = OnceLock::new();

/// Starts the transfers runtime: `threads` workers at nice value `nice` (`upload.transfer_nice`).
/// Called at server start; without it the first upload starts one worker per CPU at nice 0.
pub fn init(threads: usize, nice: i32) {
    RUNTIME.get_or_init(|| build(threads, nice));
}

fn runtime() -> &'static Runtime {
    RUNTIME.get_or_init(|| {
        build(
            std::thread::available_parallelism().map_or(1, |n| n.get()),
            0,
        )
    })
}

fn build(threads: usize, nice: i32) -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .thread_name("berth-transfer")
        // Worker threads only (tokio calls this on workers, not on its blocking threads): a
        // blocking thread may hold the metadata store's write lock, which a request on the
        // HTTP runtime may be waiting for.
        .on_thread_unpark(move || lower_priority(nice))
        .enable_all()
        .build()
        .expect("the transfers runtime starts")
}

thread_local! {
    static LOWERED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Gives the calling thread `nice`, once.
fn lower_priority(nice: i32) {
    if nice == 0 || LOWERED.get() {
        return;
    }
    LOWERED.set(true);
    // SAFETY: setpriority only changes the calling thread's nice value (Linux: who = 0 is
    // the calling thread, not the process).
    unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) };
}

/// Runs `job` on the transfers runtime, feeding it `body` chunk by chunk as it asks.
/// `job` gets the body as a [`RemoteBody`]; its result is returned here.
pub async fn run<T, F, Fut>(body: &mut dyn BodySource, job: F) -> RegistryResult<T>
where
    F: FnOnce(RemoteBody) -> Fut,
    Fut: Future<Output = RegistryResult<T>> + Send + 'static,
    T: Send + 'static,
{
    let (want_tx, mut want_rx) = mpsc::channel(1);
    let (chunk_tx, chunk_rx) = mpsc::channel(1);
    let mut task = runtime().spawn(job(RemoteBody {
        want: want_tx,
        chunks: chunk_rx,
    }));
    loop {
        tokio::select! {
            biased;
            done = &mut task => {
                return done.unwrap_or_else(|e| {
                    Err(RegistryError::Internal(format!("upload task: {e}")))
                });
            }
            wanted = want_rx.recv() => {
                if wanted.is_none() {
                    // The job dropped the body: it finishes without it.
                    break;
                }
                let chunk = body.next_chunk().await;
                // A job gone meanwhile returns its result above.
                let _ = chunk_tx.send(chunk).await;
            }
        }
    }
    task.await
        .unwrap_or_else(|e| Err(RegistryError::Internal(format!("upload task: {e}"))))
}

/// The request body as the transfers task sees it: each call asks the HTTP worker for the
/// next chunk.
pub struct RemoteBody {
    want: mpsc::Sender<()>,
    chunks: mpsc::Receiver<std::io::Result<Option<Bytes>>>,
}

#[async_trait::async_trait]
impl BodySource for RemoteBody {
    async fn next_chunk(&mut self) -> std::io::Result<Option<Bytes>> {
        let gone = || std::io::Error::other("the request ended");
        self.want.send(()).await.map_err(|_| gone())?;
        self.chunks.recv().await.ok_or_else(gone)?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Chunks of a buffer, counting how many were read.
    struct Counted {
        chunks: Vec<Bytes>,
        read: usize,
    }

    #[async_trait::async_trait]
    impl BodySource for Counted {
        async fn next_chunk(&mut self) -> std::io::Result<Option<Bytes>> {
            if self.read == self.chunks.len() {
                return Ok(None);
            }
            self.read += 1;
            Ok(Some(self.chunks[self.read - 1].clone()))
        }
    }

    fn body(n: usize) -> Counted {
        Counted {
            chunks: (0..n).map(|i| Bytes::from(vec![i as u8; 1000])).collect(),
            read: 0,
        }
    }

    #[tokio::test]
    async fn the_job_gets_the_whole_body_in_order_on_another_runtime() {
        let caller = tokio::runtime::Handle::current().id();
        let mut b = body(50);
        let (seen, other_runtime) = run(&mut b, move |mut body| async move {
            let mut seen = Vec::new();
            while let Some(c) = body.next_chunk().await.unwrap() {
                seen.push(c[0]);
            }
            Ok((seen, tokio::runtime::Handle::current().id() != caller))
        })
        .await
        .unwrap();
        assert_eq!(seen, (0..50).map(|i| i as u8).collect::<Vec<_>>());
        assert!(other_runtime);
    }

    #[tokio::test]
    async fn chunks_are_read_only_when_the_job_asks() {
        let mut b = body(50);
        let r = run(&mut b, |mut body| async move {
            body.next_chunk().await.unwrap();
            body.next_chunk().await.unwrap();
            // Stops without reading on, as an upload refused half way does.
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            Err::<(), _>(RegistryError::SizeInvalid("stop".into()))
        })
        .await;
        assert!(matches!(r, Err(RegistryError::SizeInvalid(_))));
        // Nothing read ahead: the rest stays for the caller (to drain or to close).
        assert_eq!(b.read, 2);
    }
}
