//! A [`MetaStore`] decorator that times every operation into
//! `berth_metadata_operation_duration_seconds{operation}`. Histogram handles are resolved once,
//! at construction; any backend gets the metrics by being wrapped.

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use prometheus::Histogram;

use super::{
    BlobCollection, BlobRecord, Candidate, CandidateKind, Linked, ManifestPut, ManifestRecord,
    MetaResult, MetaStore, PendingChange, QueuedCandidate, Referrer, TagInfo, UploadSession,
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
    adopt_blobs: Histogram,
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
    gc_candidates: Histogram,
    gc_queue_len: Histogram,
    gc_enqueue: Histogram,
    gc_dequeue: Histogram,
    collect_blob: Histogram,
    collect_blobs: Histogram,
    unreferenced: Histogram,
    collect_manifest: Histogram,
    blobs: Histogram,
    is_referenced: Histogram,
    repo_manifests: Histogram,
    tag_details: Histogram,
    delete_tag_if: Histogram,
}

impl<M: MetaStore> Instrumented<M> {
    pub fn new(inner: M) -> Self {
        let timers = Timers {
            claim: META.op("claim"),
            release: META.op("release"),
            blob: META.op("blob"),
            repo_blob: META.op("repo_blob"),
            link_blob: META.op("link_blob"),
            adopt_blobs: META.op("adopt_blobs"),
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
            gc_candidates: META.op("gc_candidates"),
            gc_queue_len: META.op("gc_queue_len"),
            gc_enqueue: META.op("gc_enqueue"),
            gc_dequeue: META.op("gc_dequeue"),
            collect_blob: META.op("collect_blob"),
            collect_blobs: META.op("collect_blobs"),
            unreferenced: META.op("unreferenced"),
            collect_manifest: META.op("collect_manifest"),
            blobs: META.op("blobs"),
            is_referenced: META.op("is_referenced"),
            repo_manifests: META.op("repo_manifests"),
            tag_details: META.op("tag_details"),
            delete_tag_if: META.op("delete_tag_if"),
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

    async fn adopt_blobs(
        &self,
        repo: &str,
        blobs: &[(Digest, BlobRecord)],
    ) -> MetaResult<Vec<Linked>> {
        let _t = self.timers.adopt_blobs.start_timer();
        self.inner.adopt_blobs(repo, blobs).await
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
    ) -> MetaResult<ManifestPut> {
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

    // Not timed: the watermark is read at start and written in the background.
    async fn journal_watermark(&self) -> MetaResult<Option<String>> {
        self.inner.journal_watermark().await
    }

    async fn set_journal_watermark(&self, watermark: &str) -> MetaResult<()> {
        self.inner.set_journal_watermark(watermark).await
    }

    async fn gc_candidates(
        &self,
        kind: CandidateKind,
        cutoff: u64,
        limit: usize,
    ) -> MetaResult<Vec<QueuedCandidate>> {
        let _t = self.timers.gc_candidates.start_timer();
        self.inner.gc_candidates(kind, cutoff, limit).await
    }

    async fn gc_queue_len(&self) -> MetaResult<u64> {
        let _t = self.timers.gc_queue_len.start_timer();
        self.inner.gc_queue_len().await
    }

    async fn gc_enqueue(&self, candidates: &[Candidate], now: u64) -> MetaResult<u64> {
        let _t = self.timers.gc_enqueue.start_timer();
        self.inner.gc_enqueue(candidates, now).await
    }

    async fn gc_dequeue(&self, candidates: &[Candidate]) -> MetaResult<()> {
        let _t = self.timers.gc_dequeue.start_timer();
        self.inner.gc_dequeue(candidates).await
    }

    async fn collect_blob(&self, digest: &Digest, cutoff: u64) -> MetaResult<BlobCollection> {
        let _t = self.timers.collect_blob.start_timer();
        self.inner.collect_blob(digest, cutoff).await
    }

    async fn collect_blobs(
        &self,
        digests: &[Digest],
        cutoff: u64,
    ) -> MetaResult<Vec<BlobCollection>> {
        let _t = self.timers.collect_blobs.start_timer();
        self.inner.collect_blobs(digests, cutoff).await
    }

    async fn collect_manifest(
        &self,
        repo: &str,
        digest: &Digest,
        cutoff: u64,
    ) -> MetaResult<Option<ManifestRecord>> {
        let _t = self.timers.collect_manifest.start_timer();
        self.inner.collect_manifest(repo, digest, cutoff).await
    }

    async fn blobs(
        &self,
        after: Option<&Digest>,
        limit: usize,
    ) -> MetaResult<Vec<(Digest, BlobRecord)>> {
        let _t = self.timers.blobs.start_timer();
        self.inner.blobs(after, limit).await
    }

    async fn is_referenced(&self, digest: &Digest) -> MetaResult<bool> {
        let _t = self.timers.is_referenced.start_timer();
        self.inner.is_referenced(digest).await
    }

    async fn unreferenced(&self, digests: &[Digest]) -> MetaResult<Vec<Digest>> {
        let _t = self.timers.unreferenced.start_timer();
        self.inner.unreferenced(digests).await
    }

    async fn repo_manifests(
        &self,
        repo: &str,
        after: Option<&Digest>,
        limit: usize,
    ) -> MetaResult<Vec<Digest>> {
        let _t = self.timers.repo_manifests.start_timer();
        self.inner.repo_manifests(repo, after, limit).await
    }

    async fn tag_details(
        &self,
        repo: &str,
        last: Option<&str>,
        limit: usize,
    ) -> MetaResult<Vec<TagInfo>> {
        let _t = self.timers.tag_details.start_timer();
        self.inner.tag_details(repo, last, limit).await
    }

    async fn delete_tag_if(&self, repo: &str, tag: &str, digest: &Digest) -> MetaResult<bool> {
        let _t = self.timers.delete_tag_if.start_timer();
        self.inner.delete_tag_if(repo, tag, digest).await
    }

    /// Not timed: the readiness probe's, not a client's.
    async fn check_writable(&self) -> MetaResult<()> {
        self.inner.check_writable().await
    }
}
