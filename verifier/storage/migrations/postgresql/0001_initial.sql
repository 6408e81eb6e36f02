-- Step 1 on PostgreSQL: the schema of sqlite/0001_initial.sql (the token's zone and labels
-- included: PostgreSQL has no older databases to complete). Types keep the codec's meaning:
-- timestamps are ISO text as on SQLite, blobs BYTEA, ids BIGINT. Every text column is
-- COLLATE "C": comparisons and ORDER BY are byte order (ISO timestamps, device ids, serials,
-- page tokens), as on SQLite, whatever the database's default collation. The tables every
-- appraisal updates leave room in their pages (fillfactor), so those updates stay on the page
-- (HOT) and insert nothing into the indexes: see 0002.
CREATE TABLE meta (key TEXT COLLATE "C" PRIMARY KEY, value TEXT COLLATE "C" NOT NULL);
CREATE TABLE devices (
    device_id TEXT COLLATE "C" PRIMARY KEY,
    state TEXT COLLATE "C" NOT NULL,
    ek_certificate BYTEA NOT NULL,
    ek_public BYTEA NOT NULL,
    ak_public BYTEA NOT NULL,
    ak_name TEXT COLLATE "C" NOT NULL,
    host TEXT COLLATE "C" NOT NULL,
    zone TEXT COLLATE "C" NOT NULL DEFAULT '',
    labels TEXT COLLATE "C" NOT NULL DEFAULT '{}',
    enrolled_at TEXT COLLATE "C" NOT NULL,
    last_seen TEXT COLLATE "C"
) WITH (fillfactor = 70);
CREATE TABLE enrollments (
    enrollment_id TEXT COLLATE "C" PRIMARY KEY,
    device_id TEXT COLLATE "C" NOT NULL,
    record TEXT COLLATE "C" NOT NULL,
    secret BYTEA NOT NULL,
    channel_key_spki BYTEA NOT NULL,
    expires_at TEXT COLLATE "C" NOT NULL,
    token_sha256 TEXT COLLATE "C" NOT NULL DEFAULT ''
);
CREATE TABLE bootstrap_tokens (
    token_sha256 TEXT COLLATE "C" PRIMARY KEY,
    created_at TEXT COLLATE "C" NOT NULL,
    expires_at TEXT COLLATE "C" NOT NULL,
    used_at TEXT COLLATE "C",
    device_id TEXT COLLATE "C",
    note TEXT COLLATE "C" NOT NULL DEFAULT '',
    zone TEXT COLLATE "C" NOT NULL DEFAULT '',
    labels TEXT COLLATE "C" NOT NULL DEFAULT '{}'
);
CREATE INDEX enrollments_device ON enrollments(device_id, expires_at);
CREATE INDEX enrollments_expiry ON enrollments(expires_at);
CREATE TABLE trust (
    device_id TEXT COLLATE "C" PRIMARY KEY REFERENCES devices(device_id),
    tier TEXT COLLATE "C" NOT NULL,
    score BIGINT NOT NULL,
    result TEXT COLLATE "C" NOT NULL,
    appraised_at TEXT COLLATE "C" NOT NULL
) WITH (fillfactor = 50);
CREATE TABLE certificates (
    serial TEXT COLLATE "C" PRIMARY KEY,
    device_id TEXT COLLATE "C" NOT NULL,
    kind TEXT COLLATE "C" NOT NULL,
    not_before TEXT COLLATE "C" NOT NULL,
    not_after TEXT COLLATE "C" NOT NULL,
    der BYTEA NOT NULL,
    revoked_at TEXT COLLATE "C"
);
-- log_data is never written (always empty), kept as on SQLite: one codec.
CREATE TABLE tpm_state (
    device_id TEXT COLLATE "C" PRIMARY KEY REFERENCES devices(device_id),
    clock TEXT COLLATE "C" NOT NULL,
    log_data BYTEA NOT NULL,
    log_state TEXT COLLATE "C" NOT NULL,
    pcrs TEXT COLLATE "C" NOT NULL,
    updated_at TEXT COLLATE "C" NOT NULL
) WITH (fillfactor = 50);
CREATE TABLE event_log_parts (
    device_id TEXT COLLATE "C" NOT NULL REFERENCES devices(device_id),
    part_offset BIGINT NOT NULL,
    data BYTEA NOT NULL,
    PRIMARY KEY (device_id, part_offset)
);
CREATE INDEX certificates_device ON certificates(device_id, not_after);
CREATE TABLE audit (
    id BIGSERIAL PRIMARY KEY,
    at TEXT COLLATE "C" NOT NULL,
    device_id TEXT COLLATE "C" NOT NULL,
    event TEXT COLLATE "C" NOT NULL,
    tier TEXT COLLATE "C" NOT NULL DEFAULT '',
    detail TEXT COLLATE "C" NOT NULL
);
