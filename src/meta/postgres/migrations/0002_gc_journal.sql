-- berth metadata, schema version 2: what garbage collection and the bucket journal need.
-- Manifests stored before this version get their references from their bodies, computed by
-- berth in the same transaction (migrations.rs) and the column is then made NOT NULL.

-- What a manifest references, deduplicated, in first-seen order (returned as stored).
ALTER TABLE manifests ADD COLUMN refs text[];

-- The reference index: one row per (manifest, reference). A reference is held in `repo` while
-- any row of it is there; rows go with their manifest.
CREATE TABLE manifest_references (
    repo      text COLLATE "C" NOT NULL,
    manifest  text COLLATE "C" NOT NULL,
    reference text COLLATE "C" NOT NULL,
    PRIMARY KEY (repo, manifest, reference),
    FOREIGN KEY (repo, manifest) REFERENCES manifests (repo, digest) ON DELETE CASCADE
);
CREATE INDEX manifest_references_by_reference ON manifest_references (reference, repo);

-- Last time a PUT pointed the tag (unix seconds); tags from before: the upgrade's time.
ALTER TABLE tags ADD COLUMN updated bigint NOT NULL DEFAULT floor(extract(epoch FROM now()))::bigint;
ALTER TABLE tags ALTER COLUMN updated DROP DEFAULT;

-- The collector's candidates: kind 0 = a blob (repo ''), 1 = a manifest of `repo`; `since` =
-- when last touched (unix seconds).
CREATE TABLE gc_queue (
    kind   smallint NOT NULL CHECK (kind IN (0, 1)),
    repo   text COLLATE "C" NOT NULL,
    digest text COLLATE "C" NOT NULL,
    since  bigint NOT NULL,
    PRIMARY KEY (kind, repo, digest)
);
CREATE INDEX gc_queue_due ON gc_queue (kind, since, repo, digest);

-- The bucket journal's watermark: one row at most.
CREATE TABLE journal_watermark (
    one       boolean PRIMARY KEY DEFAULT true CHECK (one),
    watermark text NOT NULL
);
