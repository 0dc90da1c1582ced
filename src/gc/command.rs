//! `berth gc`: one pass on demand. A running `berth serve` owns its redb file, so the pass is
//! asked of it through its operations listener (`POST /gc` on `metrics.listen`) when it
//! answers there; otherwise the command opens the stores itself and runs the pass.

use std::sync::Arc;
use std::time::Duration;

use super::{Collector, GcOptions, GcReport};
use crate::config::Config;

/// Runs the pass and returns its report, or why it could not.
pub fn run(config: Config, opts: GcOptions) -> Result<GcReport, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("runtime: {e}"))?;
    if let Some(addr) = config.metrics.listen {
        let reachable = rt.block_on(async {
            tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr))
                .await
                .is_ok_and(|c| c.is_ok())
        });
        if reachable {
            return rt.block_on(ask_server(addr, opts));
        }
    }
    drop(rt);
    let gc_config = config.gc.clone();
    let (_, registry) = crate::server::prepare(config).map_err(|e| {
        let msg = e.to_string();
        if msg.contains("already open") || msg.contains("lock") {
            format!(
                "{msg}: is `berth serve` running on this data directory? Set metrics.listen \
                 in its config so that `berth gc` can ask it"
            )
        } else {
            msg
        }
    })?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| format!("runtime: {e}"))?;
    let collector = Collector::new(registry.meta.clone(), registry.store.clone(), gc_config);
    rt.block_on(collector.run(opts)).map_err(|e| e.to_string())
}

/// The query string of `POST /gc` for `opts`.
pub fn query(opts: GcOptions) -> String {
    format!(
        "dry_run={}&full={}&orphans={}",
        opts.dry_run, opts.full, opts.orphans
    )
}

/// Parses the query string of `POST /gc`.
pub fn parse_query(q: Option<&str>) -> Result<GcOptions, String> {
    let mut opts = GcOptions::default();
    for pair in q.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, "true"));
        let v = match v {
            "true" | "1" | "" => true,
            "false" | "0" => false,
            other => return Err(format!("{k}: expected true or false, got {other:?}")),
        };
        match k {
            "dry_run" => opts.dry_run = v,
            "full" => opts.full = v,
            "orphans" => opts.orphans = v,
            other => return Err(format!("unknown parameter {other:?}")),
        }
    }
    Ok(opts)
}

async fn ask_server(addr: std::net::SocketAddr, opts: GcOptions) -> Result<GcReport, String> {
    let url = format!("http://{addr}/gc?{}", query(opts));
    let client = reqwest::Client::builder()
        .no_proxy()
        .build()
        .map_err(|e| e.to_string())?;
    let resp = client
        .post(&url)
        .send()
        .await
        .map_err(|e| format!("POST {url}: {e}"))?;
    let status = resp.status();
    let body = resp.bytes().await.map_err(|e| format!("POST {url}: {e}"))?;
    if !status.is_success() {
        return Err(format!(
            "POST {url}: {status}: {}",
            String::from_utf8_lossy(&body).trim()
        ));
    }
    serde_json::from_slice(&body).map_err(|e| format!("POST {url}: unreadable report: {e}"))
}

/// The collector `berth serve` runs (every `gc.interval`, and on `POST /gc`), yielding to
/// the requests `busy` reports.
pub fn collector_for(
    registry: &crate::registry::Registry,
    config: &Config,
    busy: super::Busy,
) -> Arc<Collector> {
    Arc::new(
        Collector::new(
            registry.meta.clone(),
            registry.store.clone(),
            config.gc.clone(),
        )
        .yielding_to(busy),
    )
}
