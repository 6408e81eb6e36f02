-- Several verifier processes on one database (issue 11, item 3; replicas with issue 12).
--
-- changes: an outbox of what another process must learn, filled by triggers in the same
-- transaction as the change itself (nothing committed is missing from it, nothing in it was
-- rolled back), read in seq order by every process (storage/sqlite_changes.py). kind:
--   trust       a device's tier or score changed (ref: the new tier, previous: the old one,
--               result: the result stored, as the trust row holds it)
--   revoked     a certificate was revoked (ref: its serial)
--   device      an operator or an enrollment revoked or moved a device (ref: its state,
--               previous: its zone before, zone: after)
--   lease       a newer attestation stream took the device's lease (ref: the lease token)
--   policy      a process reloaded the policy (written by it, origin names it)
CREATE TABLE changes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    device_id TEXT NOT NULL DEFAULT '',
    ref TEXT NOT NULL DEFAULT '',
    previous TEXT NOT NULL DEFAULT '',
    zone TEXT NOT NULL DEFAULT '',
    origin TEXT NOT NULL DEFAULT '',
    result TEXT
);

-- One live attestation stream per device across processes: a newer stream claims the lease
-- (token + 1); a decision is stored only while its stream's token is the device's.
CREATE TABLE stream_leases (
    device_id TEXT PRIMARY KEY,
    token INTEGER NOT NULL,
    owner TEXT NOT NULL
);

CREATE TRIGGER changes_trust_new AFTER INSERT ON trust
BEGIN
    INSERT INTO changes (kind, device_id, ref, result)
    VALUES ('trust', NEW.device_id, NEW.tier, NEW.result);
END;

-- An unchanged tier and score (the steady state) writes nothing here.
CREATE TRIGGER changes_trust AFTER UPDATE OF tier, score ON trust
WHEN OLD.tier IS NOT NEW.tier OR OLD.score IS NOT NEW.score
BEGIN
    INSERT INTO changes (kind, device_id, ref, previous, result)
    VALUES ('trust', NEW.device_id, NEW.tier, OLD.tier, NEW.result);
END;

CREATE TRIGGER changes_revoked AFTER UPDATE OF revoked_at ON certificates
WHEN OLD.revoked_at IS NULL AND NEW.revoked_at IS NOT NULL
BEGIN
    INSERT INTO changes (kind, device_id, ref) VALUES ('revoked', NEW.device_id, NEW.serial);
END;

CREATE TRIGGER changes_device AFTER UPDATE OF state, zone ON devices
WHEN (NEW.state = 'revoked' AND OLD.state IS NOT 'revoked') OR OLD.zone IS NOT NEW.zone
BEGIN
    INSERT INTO changes (kind, device_id, ref, previous, zone)
    VALUES ('device', NEW.device_id, NEW.state, OLD.zone, NEW.zone);
END;

CREATE TRIGGER changes_lease AFTER UPDATE OF token ON stream_leases
BEGIN
    INSERT INTO changes (kind, device_id, ref, origin)
    VALUES ('lease', NEW.device_id, CAST(NEW.token AS TEXT), NEW.owner);
END;
