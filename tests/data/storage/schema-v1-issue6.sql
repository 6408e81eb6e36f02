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
    note TEXT NOT NULL DEFAULT ''
);
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
CREATE TABLE IF NOT EXISTS tpm_state (
    device_id TEXT PRIMARY KEY REFERENCES devices(device_id),
    clock TEXT NOT NULL,
    log_data BLOB NOT NULL,
    log_state TEXT NOT NULL,
    pcrs TEXT NOT NULL,
    updated_at TEXT NOT NULL
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
