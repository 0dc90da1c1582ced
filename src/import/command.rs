//! The `berth import` command: opens berth's stores as `berth serve` would, picks the source,
//! runs the import and prints its summary.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use super::source::{BucketSource, DirSource, Source};
use crate::config::Config;

/// Where distribution's storage is.
pub enum From {
    /// In berth's bucket, below distribution's `rootdirectory`.
    Bucket { root_directory: String },
    /// A filesystem `rootdirectory`, adopted into the embedded object store.
    Dir(PathBuf),
}

pub fn run(config: Config, from: From) -> ExitCode {
    if let From::Dir(dir) = &from {
        if config.storage.endpoint.is_some() {
            eprintln!(
                "berth import: --from-dir adopts into the embedded object store, and this config \
                 names storage.endpoint. Put distribution's directory into the bucket (or point \
                 distribution's S3 driver at it) and use --from-bucket."
            );
            return ExitCode::from(2);
        }
        if !dir.join(super::layout::V2).is_dir() {
            eprintln!(
                "berth import: {} has no {} (give distribution's rootdirectory)",
                dir.display(),
                super::layout::V2
            );
            return ExitCode::from(2);
        }
    }
    let bucket_dir = config.data_dir.join("objects").join(&config.storage.bucket);
    let (_config, registry) = match crate::server::prepare(config) {
        Ok(r) => r,
        Err(e) => {
            eprintln!(
                "berth import: cannot open berth's stores: {e} (with the embedded metadata \
                 store, stop `berth serve` on this data_dir first)"
            );
            return ExitCode::from(1);
        }
    };
    let source: Box<dyn Source> = match from {
        From::Bucket { root_directory } => {
            Box::new(BucketSource::new(registry.store.clone(), &root_directory))
        }
        From::Dir(root) => Box::new(DirSource { root, bucket_dir }),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("berth import: {e}");
            return ExitCode::from(1);
        }
    };
    let registry = Arc::clone(&registry);
    match runtime.block_on(super::run(&registry, source.as_ref())) {
        Ok(summary) => {
            print!("{summary}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("berth {e} (nothing recorded is lost: run the import again)");
            ExitCode::from(1)
        }
    }
}
