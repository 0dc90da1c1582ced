//! A [`MetaStore`] decorator that times every operation into
//! `berth_metadata_operation_duration_seconds{operation}`. Histogram handles are resolved once,
//! at construction; any backend gets the metrics by being wrapped.

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use prometheus::Histogram;

use super::{
    BlobRecord, Linked, ManifestRecord, MetaResult, MetaStore, PendingChange, Referrer,
    UploadSession,
};
use crate::metrics::META;
use crate::registry::names::Digest;

pub struct Instrumented<M> {
    inner: M,
    timers: Timers,
}

struct Timers {
    claim: Histogram,
    release: Histogram,
    blob: Histogram,
    repo_blob: Histogram,
    link_blob: Histogram,
    unlink_blob: Histogram,
    put_manifest: Histogram,
    manifest: Histogram,
    tagged_manifest: Histogram,
    delete_manifest: Histogram,
    delete_tag: Histogram,
    tags: Histogram,
    repositories: Histogram,
    repository_exists: Histogram,
    referrers: Histogram,
    create_upload: Histogram,
    upload: Histogram,
    pending: Histogram,
    save_upload: Histogram,
    delete_upload: Histogram,
    idle_uploads: Histogram,
    finish_upload: Histogram,
}

impl<M: MetaStore> Instrumented<M> {
    pub fn new(inner: M) -> Self {
        let timers = Timers {
            claim: META.op("claim"),
            release: META.op("release"),
            blob: META.op("blob"),
            repo_blob: META.op("repo_blob"),
            link_blob: META.op("link_blob"),
            unlink_blob: META.op("unlink_blob"),
            put_manifest: META.op("put_manifest"),
            manifest: META.op("manifest"),
            tagged_manifest: META.op("tagged_manifest"),
            delete_manifest: META.op("delete_manifest"),
            delete_tag: META.op("delete_tag"),
            tags: META.op("tags"),
            repositories: META.op("repositories"),
            repository_exists: META.op("repository_exists"),
            referrers: META.op("referrers"),
            create_upload: META.op("create_upload"),
            upload: META.op("upload"),
            pending: META.op("pending"),
            save_upload: META.op("save_upload"),
            delete_upload: META.op("delete_upload"),
            idle_uploads: META.op("idle_uploads"),
            finish_upload: META.op("finish_upload"),
        };
        Instrumented { inner, timers }
    }
}

#[async_trait]
impl<M: MetaStore> MetaStore for Instrumented<M> {
    async fn claim(&self, name: &str, holder: &str, ttl: Duration) -> MetaResult<bool> {
        let _t = self.timers.claim.start_timer();
        self.inner.claim(name, holder, ttl).await
    }

    async fn release(&self, name: &str, holder: &str) -> MetaResult<()> {
        let _t = self.timers.release.start_timer();
        self.inner.release(name, holder).await
    }

    async fn blob(&self, digest: &Digest) -> MetaResult<Option<BlobRecord>> {
        let _t = self.timers.blob.start_timer();
        self.inner.blob(digest).await
    }

    async fn repo_blob(&self, repo: &str, digest: &Digest) -> MetaResult<Option<BlobRecord>> {
        let _t = self.timers.repo_blob.start_timer();
        self.inner.repo_blob(repo, digest).await
    }

    async fn link_blob(&self, repo: &str, digest: &Digest) -> MetaResult<bool> {
        let _t = self.timers.link_blob.start_timer();
        self.inner.link_blob(repo, digest).await
    }

    async fn unlink_blob(&self, repo: &str, digest: &Digest) -> MetaResult<bool> {
        let _t = self.timers.unlink_blob.start_timer();
        self.inner.unlink_blob(repo, digest).await
    }

    async fn put_manifest(
        &self,
        repo: &str,
        digest: &Digest,
        record: ManifestRecord,
        tag: Option<&str>,
        referrer: Option<Referrer>,
    ) -> MetaResult<()> {
        let _t = self.timers.put_manifest.start_timer();
        self.inner
            .put_manifest(repo, digest, record, tag, referrer)
            .await
    }

    async fn manifest(&self, repo: &str, digest: &Digest) -> MetaResult<Option<ManifestRecord>> {
        let _t = self.timers.manifest.start_timer();
        self.inner.manifest(repo, digest).await
    }

    async fn tagged_manifest(
        &self,
        repo: &str,
        tag: &str,
    ) -> MetaResult<Option<(Digest, ManifestRecord)>> {
        let _t = self.timers.tagged_manifest.start_timer();
        self.inner.tagged_manifest(repo, tag).await
    }

    async fn delete_manifest(&self, repo: &str, digest: &Digest) -> MetaResult<bool> {
        let _t = self.timers.delete_manifest.start_timer();
        self.inner.delete_manifest(repo, digest).await
    }

    async fn delete_tag(&self, repo: &str, tag: &str) -> MetaResult<bool> {
        let _t = self.timers.delete_tag.start_timer();
        self.inner.delete_tag(repo, tag).await
    }

    async fn tags(&self, repo: &str, last: Option<&str>, limit: usize) -> MetaResult<Vec<String>> {
        let _t = self.timers.tags.start_timer();
        self.inner.tags(repo, last, limit).await
    }

    async fn repositories(&self, last: Option<&str>, limit: usize) -> MetaResult<Vec<String>> {
        let _t = self.timers.repositories.start_timer();
        self.inner.repositories(last, limit).await
    }

    async fn repository_exists(&self, repo: &str) -> MetaResult<bool> {
        let _t = self.timers.repository_exists.start_timer();
        self.inner.repository_exists(repo).await
    }

    async fn referrers(&self, repo: &str, subject: &Digest) -> MetaResult<Vec<Bytes>> {
        let _t = self.timers.referrers.start_timer();
        self.inner.referrers(repo, subject).await
    }

    async fn create_upload(&self, session: &UploadSession) -> MetaResult<()> {
        let _t = self.timers.create_upload.start_timer();
        self.inner.create_upload(session).await
    }

    async fn upload(&self, id: &str) -> MetaResult<Option<UploadSession>> {
        let _t = self.timers.upload.start_timer();
        self.inner.upload(id).await
    }

    async fn pending(&self, id: &str) -> MetaResult<Bytes> {
        let _t = self.timers.pending.start_timer();
        self.inner.pending(id).await
    }

    async fn save_upload(&self, session: &UploadSession, pending: PendingChange) -> MetaResult<()> {
        let _t = self.timers.save_upload.start_timer();
        self.inner.save_upload(session, pending).await
    }

    async fn delete_upload(&self, id: &str) -> MetaResult<bool> {
        let _t = self.timers.delete_upload.start_timer();
        self.inner.delete_upload(id).await
    }

    async fn idle_uploads(&self, cutoff: u64) -> MetaResult<Vec<UploadSession>> {
        let _t = self.timers.idle_uploads.start_timer();
        self.inner.idle_uploads(cutoff).await
    }

    async fn finish_upload(
        &self,
        id: &str,
        repo: &str,
        digest: &Digest,
        record: BlobRecord,
    ) -> MetaResult<Linked> {
        let _t = self.timers.finish_upload.start_timer();
        self.inner.finish_upload(id, repo, digest, record).await
    }
}
