-- berth metadata, schema version 3: the bucket journal's order across nodes. A node writing a
-- record holds the record's stripes (session advisory locks, see PgStore::journal_order) from
-- before the record until after its commit, and gives the record a time after `last_ms` of
-- each stripe: for writes to the same items, the records' key order is the commit order.
CREATE TABLE journal_order (
    stripe  integer PRIMARY KEY,
    last_ms bigint NOT NULL
);
