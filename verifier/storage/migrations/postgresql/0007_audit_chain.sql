-- The audit trail shows tampering (issue 12, item 4; verifier/audit_chain.py). Every entry
-- joins a hash chain: its device's (chain = its device id) or a named one for fleet-wide
-- events (policy, roles, audit); chain_seq counts 1, 2, ... along it, prev_hash is the hash
-- of the entry before (the genesis hash, 64 zeros, for the first), hash = sha256(prev_hash
-- || the entry's canonical encoding). Entries written before this step have chain NULL
-- until sealed (storage/audit_rows.seal: at the first entry of their chain, or
-- `devtrust audit seal`): the hash is computed in Python, the same on every backend.
ALTER TABLE audit ADD COLUMN chain TEXT COLLATE "C";
ALTER TABLE audit ADD COLUMN chain_seq BIGINT;
ALTER TABLE audit ADD COLUMN prev_hash TEXT COLLATE "C";
ALTER TABLE audit ADD COLUMN hash TEXT COLLATE "C";
CREATE UNIQUE INDEX audit_chain ON audit(chain, chain_seq);
-- The entries still off a chain (none, once sealed): found without reading the others.
CREATE INDEX audit_unsealed ON audit(id) WHERE chain IS NULL;
-- The last entry of each chain, replaced in the transaction of every entry: two replicas
-- extending one chain conflict on this row (one serializable transaction is retried);
-- replicas on different chains share nothing. A deleted tail shows against it. Free space
-- in each page (fillfactor) keeps the replacement a heap-only update: no new entry in the
-- primary key's index, whose pages the serializable readers of other chains' heads lock.
CREATE TABLE audit_heads (
    chain TEXT COLLATE "C" PRIMARY KEY,
    seq BIGINT NOT NULL,
    hash TEXT COLLATE "C" NOT NULL
) WITH (fillfactor = 50);
-- The hash of a chain at a seq: every 1000 entries (a deletion they cover shows), and where
-- retention (`devtrust audit prune`) deleted the entries up to it (pruned = 1): the rest of
-- the chain verifies from there.
CREATE TABLE audit_checkpoints (
    chain TEXT COLLATE "C" NOT NULL,
    chain_seq BIGINT NOT NULL,
    hash TEXT COLLATE "C" NOT NULL,
    at TEXT COLLATE "C" NOT NULL,
    pruned INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (chain, chain_seq)
);
-- The last entry written before this step: only entries up to it are ever sealed onto a
-- chain (storage/audit_rows.seal). An entry off a chain with a higher id was not written by
-- append (which chains every entry), so it stays off, and verify names it.
CREATE TABLE audit_legacy (
    last_id BIGINT NOT NULL
);
INSERT INTO audit_legacy (last_id) SELECT COALESCE(MAX(id), 0) FROM audit;
