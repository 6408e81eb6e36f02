-- ListDevices filters and pages in SQL (issue 9): the latest result's staleness bound as a
-- column (a result past it counts as tier none), and indexes for the device filters and for
-- a device's audit trail.
ALTER TABLE trust ADD COLUMN expires_at TEXT NOT NULL DEFAULT '';
UPDATE trust SET expires_at = json_extract(result, '$.expires_at');
CREATE INDEX devices_zone ON devices(zone, device_id);
CREATE INDEX devices_last_seen ON devices(last_seen);
CREATE INDEX trust_tier ON trust(tier, expires_at);
CREATE INDEX audit_device ON audit(device_id, id);
