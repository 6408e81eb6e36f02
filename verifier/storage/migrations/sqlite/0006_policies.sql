-- The policy every replica appraises with (issue 12): the one current policy (slot
-- 'current'), its id, its digest (hex sha256 of its text and data) and its documents (JSON:
-- file name -> text, every file it was loaded from), so a replica loads the identical policy
-- without files of its own. Publishing one also writes a 'policy' row on the change feed
-- (the other processes reload) and an audit entry, in the same transaction
-- (storage/policies.py).
CREATE TABLE policies (
    slot TEXT PRIMARY KEY,
    policy_id TEXT NOT NULL,
    digest TEXT NOT NULL,
    documents TEXT NOT NULL,
    published_at TEXT NOT NULL,
    published_by TEXT NOT NULL DEFAULT ''
);
