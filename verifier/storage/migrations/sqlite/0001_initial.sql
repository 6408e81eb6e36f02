-- The schema of devtrust before numbered migrations (meta schema_version 1), unchanged: every
-- statement idempotent, so that it also completes a database made by that code (tables added
-- since it was made are created; the runner adds the token columns of issue 7).
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS devices (
    device_id TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    ek_certificate BLOB NOT NULL,
    ek_public BLOB NOT NULL,
    ak_public BLOB NOT NULL,
    ak_name TEXT NOT NULL,
    host TEXT NOT NULL,
    zone TEXT NOT NULL DEFAULT '',
    labels TEXT NOT NULL DEFAULT '{}',
    enrolled_at TEXT NOT NULL,
    last_seen TEXT
);
CREATE TABLE IF NOT EXISTS enrollments (
    enrollment_id TEXT PRIMARY KEY,
    device_id TEXT NOT NULL,
    record TEXT NOT NULL,
    secret BLOB NOT NULL,
    channel_key_spki BLOB NOT NULL,
    expires_at TEXT NOT NULL,
    token_sha256 TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS bootstrap_tokens (
    token_sha256 TEXT PRIMARY KEY,
    created_at TEXT NOT NULL,
    expires_at TEXT NOT NULL,
    used_at TEXT,
    device_id TEXT,
    note TEXT NOT NULL DEFAULT '',
    zone TEXT NOT NULL DEFAULT '',
    labels TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS enrollments_device ON enrollments(device_id, expires_at);
CREATE INDEX IF NOT EXISTS enrollments_expiry ON enrollments(expires_at);
CREATE TABLE IF NOT EXISTS trust (
    device_id TEXT PRIMARY KEY REFERENCES devices(device_id),
    tier TEXT NOT NULL,
    score INTEGER NOT NULL,
    result TEXT NOT NULL,
    appraised_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS certificates (
    serial TEXT PRIMARY KEY,
    device_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    not_before TEXT NOT NULL,
    not_after TEXT NOT NULL,
    der BLOB NOT NULL,
    revoked_at TEXT
);
-- log_state: the event log's size, event count and banks (JSON); the log itself is in
-- event_log_parts. log_data is no longer written (always empty): it stays so that databases
-- made before the log was stored append-only (issue 7) still open; their logs are read again.
CREATE TABLE IF NOT EXISTS tpm_state (
    device_id TEXT PRIMARY KEY REFERENCES devices(device_id),
    clock TEXT NOT NULL,
    log_data BLOB NOT NULL,
    log_state TEXT NOT NULL,
    pcrs TEXT NOT NULL,
    updated_at TEXT NOT NULL
);
-- Each device's event log since its last reboot, in the parts it was accepted in: appended,
-- never rewritten; a part at offset 0 (a new log) replaces the device's older parts.
CREATE TABLE IF NOT EXISTS event_log_parts (
    device_id TEXT NOT NULL REFERENCES devices(device_id),
    part_offset INTEGER NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (device_id, part_offset)
);
CREATE INDEX IF NOT EXISTS certificates_device ON certificates(device_id, not_after);
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at TEXT NOT NULL,
    device_id TEXT NOT NULL,
    event TEXT NOT NULL,
    tier TEXT NOT NULL DEFAULT '',
    detail TEXT NOT NULL
);
