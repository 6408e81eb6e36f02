-- The policy every replica appraises with (issue 12; sqlite/0006): the one current policy
-- (slot 'current'), its id, digest and documents (JSON: file name -> text).
CREATE TABLE policies (
    slot TEXT COLLATE "C" PRIMARY KEY,
    policy_id TEXT COLLATE "C" NOT NULL,
    digest TEXT COLLATE "C" NOT NULL,
    documents TEXT COLLATE "C" NOT NULL,
    published_at TEXT COLLATE "C" NOT NULL,
    published_by TEXT COLLATE "C" NOT NULL DEFAULT ''
);
