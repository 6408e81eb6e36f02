-- Operator roles and the actor of every audit entry (issue 10). Roles are assigned to
-- operator names, not written into certificates (verifier/roles.py): a role taken away here
-- is refused at the operator's next call. The configuration's `operators:` wins over a row
-- here for the names it lists. updated_by: who assigned it ("operator/NAME", "local/USER").
CREATE TABLE roles (
    name TEXT PRIMARY KEY,
    role TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    updated_by TEXT NOT NULL DEFAULT ''
);
-- Who made each change: "operator/NAME", "device", "verifier"; entries written before this
-- step name nobody ('').
ALTER TABLE audit ADD COLUMN actor TEXT NOT NULL DEFAULT '';
