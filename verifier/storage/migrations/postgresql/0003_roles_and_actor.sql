-- Operator roles and the actor of every audit entry (issue 10; sqlite/0003).
CREATE TABLE roles (
    name TEXT COLLATE "C" PRIMARY KEY,
    role TEXT COLLATE "C" NOT NULL,
    updated_at TEXT COLLATE "C" NOT NULL,
    updated_by TEXT COLLATE "C" NOT NULL DEFAULT ''
);
ALTER TABLE audit ADD COLUMN actor TEXT COLLATE "C" NOT NULL DEFAULT '';
