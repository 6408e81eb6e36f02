-- Several verifier processes on one database (issue 11; replicas with issue 12): the change
-- feed and the stream leases of sqlite/0005, with the same kinds and meaning (read there).
--
-- Readers follow the feed by seq, so seq order must be commit order: a reader that has seen
-- seq N must never later find a newly committed row below N. A sequence alone does not give
-- that (two transactions take 7 and 8, 8 commits first, a reader moves past 7 for ever), so
-- every row is numbered by changes_number() below, which first takes a transaction-scoped
-- advisory lock: a second transaction writing changes waits until the first committed
-- (PostgreSQL makes a commit visible before it releases the locks), and only then takes its
-- number. This serialises only the transactions that write changes (tier changes,
-- revocations, moves and revocations of devices, leases, policies): an appraisal that
-- changes no tier writes none and never waits. A number taken by a transaction that then
-- rolled back is a hole in seq, which readers skip (a hole is no gap: storage/changes.py).
-- NOTIFY devtrust_changes (delivered at commit, one per transaction) wakes the followers;
-- they poll too, in case a notification is lost with a connection (storage/pg_feed.py).
CREATE SEQUENCE changes_seq;
CREATE TABLE changes (
    seq BIGINT PRIMARY KEY,
    kind TEXT COLLATE "C" NOT NULL,
    device_id TEXT COLLATE "C" NOT NULL DEFAULT '',
    ref TEXT COLLATE "C" NOT NULL DEFAULT '',
    previous TEXT COLLATE "C" NOT NULL DEFAULT '',
    zone TEXT COLLATE "C" NOT NULL DEFAULT '',
    origin TEXT COLLATE "C" NOT NULL DEFAULT '',
    result TEXT COLLATE "C"
);
ALTER SEQUENCE changes_seq OWNED BY changes.seq;

CREATE TABLE stream_leases (
    device_id TEXT COLLATE "C" PRIMARY KEY,
    token BIGINT NOT NULL,
    owner TEXT COLLATE "C" NOT NULL
) WITH (fillfactor = 70);

CREATE FUNCTION changes_number() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- 7202512001: the feed's lock key (any fixed number used for nothing else).
    PERFORM pg_advisory_xact_lock(7202512001);
    NEW.seq := nextval('changes_seq');
    PERFORM pg_notify('devtrust_changes', '');
    RETURN NEW;
END
$$;
CREATE TRIGGER changes_number BEFORE INSERT ON changes
FOR EACH ROW EXECUTE FUNCTION changes_number();

CREATE FUNCTION changes_trust() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO changes (kind, device_id, ref, result)
        VALUES ('trust', NEW.device_id, NEW.tier, NEW.result);
    ELSE
        INSERT INTO changes (kind, device_id, ref, previous, result)
        VALUES ('trust', NEW.device_id, NEW.tier, OLD.tier, NEW.result);
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER changes_trust_new AFTER INSERT ON trust
FOR EACH ROW EXECUTE FUNCTION changes_trust();
-- An unchanged tier and score (the steady state) writes nothing here.
CREATE TRIGGER changes_trust AFTER UPDATE OF tier, score ON trust
FOR EACH ROW WHEN (OLD.tier IS DISTINCT FROM NEW.tier OR OLD.score IS DISTINCT FROM NEW.score)
EXECUTE FUNCTION changes_trust();

CREATE FUNCTION changes_revoked() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO changes (kind, device_id, ref) VALUES ('revoked', NEW.device_id, NEW.serial);
    RETURN NULL;
END
$$;
CREATE TRIGGER changes_revoked AFTER UPDATE OF revoked_at ON certificates
FOR EACH ROW WHEN (OLD.revoked_at IS NULL AND NEW.revoked_at IS NOT NULL)
EXECUTE FUNCTION changes_revoked();

CREATE FUNCTION changes_device() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO changes (kind, device_id, ref, previous, zone)
    VALUES ('device', NEW.device_id, NEW.state, OLD.zone, NEW.zone);
    RETURN NULL;
END
$$;
CREATE TRIGGER changes_device AFTER UPDATE OF state, zone ON devices
FOR EACH ROW WHEN (
    (NEW.state = 'revoked' AND OLD.state IS DISTINCT FROM 'revoked')
    OR OLD.zone IS DISTINCT FROM NEW.zone
)
EXECUTE FUNCTION changes_device();

CREATE FUNCTION changes_lease() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO changes (kind, device_id, ref, origin)
    VALUES ('lease', NEW.device_id, NEW.token::text, NEW.owner);
    RETURN NULL;
END
$$;
CREATE TRIGGER changes_lease AFTER UPDATE OF token ON stream_leases
FOR EACH ROW EXECUTE FUNCTION changes_lease();
