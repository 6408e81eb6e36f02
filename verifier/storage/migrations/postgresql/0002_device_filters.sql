-- ListDevices filters and pages in SQL (issue 9; sqlite/0002): the latest result's
-- staleness bound as a column, and indexes for the device filters and a device's audit trail.
-- Two indexes differ from SQLite's, with the same data: every appraisal writes the device's
-- last_seen and its trust row's expires_at, and on PostgreSQL an indexed column written makes
-- the update a non-HOT one, whose index insertions collide (SERIALIZABLE's page-level
-- predicate locks on B-tree pages) with the concurrent appraisals of every device sharing
-- the page: measured, 9 in 10 appraisals ran twice. So last_seen is not indexed (a
-- stale_before filter, an operator's query, reads the table), and trust_tier is on the tier
-- alone (the expires_at test is applied to the rows of that tier).
ALTER TABLE trust ADD COLUMN expires_at TEXT COLLATE "C" NOT NULL DEFAULT '';
UPDATE trust SET expires_at = result::jsonb ->> 'expires_at';
CREATE INDEX devices_zone ON devices(zone, device_id);
CREATE INDEX trust_tier ON trust(tier);
CREATE INDEX audit_device ON audit(device_id, id);
