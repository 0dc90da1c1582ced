-- berth metadata, schema version 1.
--
-- Text that berth orders or ranges over is COLLATE "C": tags and repositories are listed in
-- byte order (as the redb backend does) whatever the database's locale. Digests are stored as
-- their `sha256:<hex>` strings; manifest bodies raw, exactly as pushed.

CREATE TABLE repositories (
    name text COLLATE "C" PRIMARY KEY
);

-- The global blob index: digest -> where its bytes are in the bucket.
CREATE TABLE blobs (
    digest     text COLLATE "C" PRIMARY KEY,
    size       bigint NOT NULL CHECK (size >= 0),
    object_key text NOT NULL
);

-- Which repositories link a blob. A blob record cannot go while a repository links it.
CREATE TABLE repo_blobs (
    repo   text COLLATE "C" NOT NULL,
    digest text COLLATE "C" NOT NULL REFERENCES blobs (digest),
    PRIMARY KEY (repo, digest)
);
CREATE INDEX repo_blobs_by_digest ON repo_blobs (digest);

CREATE TABLE manifests (
    repo       text COLLATE "C" NOT NULL,
    digest     text COLLATE "C" NOT NULL,
    media_type text NOT NULL,
    subject    text COLLATE "C",
    body       bytea NOT NULL,
    PRIMARY KEY (repo, digest)
);

-- A tag never outlives its manifest: deleting the manifest deletes its tags.
CREATE TABLE tags (
    repo   text COLLATE "C" NOT NULL,
    tag    text COLLATE "C" NOT NULL,
    digest text COLLATE "C" NOT NULL,
    PRIMARY KEY (repo, tag),
    FOREIGN KEY (repo, digest) REFERENCES manifests (repo, digest) ON DELETE CASCADE
);
CREATE INDEX tags_by_manifest ON tags (repo, digest);

-- The referrers index: manifests of `repo` whose subject is `subject`.
CREATE TABLE referrers (
    repo       text COLLATE "C" NOT NULL,
    subject    text COLLATE "C" NOT NULL,
    digest     text COLLATE "C" NOT NULL,
    descriptor bytea NOT NULL,
    PRIMARY KEY (repo, subject, digest),
    FOREIGN KEY (repo, digest) REFERENCES manifests (repo, digest) ON DELETE CASCADE
);
CREATE INDEX referrers_by_manifest ON referrers (repo, digest);

-- Upload sessions: any node can continue one (hasher state and pending tail live here).
CREATE TABLE uploads (
    id           text PRIMARY KEY,
    repo         text NOT NULL,
    object_key   text NOT NULL,
    multipart_id text,
    parts        jsonb NOT NULL,
    received     bigint NOT NULL,
    hasher       bytea NOT NULL,
    created      bigint NOT NULL,
    updated      bigint NOT NULL
);
CREATE INDEX uploads_by_updated ON uploads (updated);

-- Bytes of a session's incomplete part, as appended chunks in sequence order.
CREATE TABLE upload_pending (
    id    text NOT NULL REFERENCES uploads (id) ON DELETE CASCADE,
    seq   integer NOT NULL,
    bytes bytea NOT NULL,
    PRIMARY KEY (id, seq)
);

-- One holder at a time (an upload's writer, the node running a background task), until
-- `expires` by the database's clock.
CREATE TABLE claims (
    name    text PRIMARY KEY,
    holder  text NOT NULL,
    expires timestamptz NOT NULL
);
