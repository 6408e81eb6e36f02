-- Revocation (issue 10): a revoked certificate keeps its revoked_at (a column since 0001)
-- and now its reason; the feed and the CRL read the revoked certificates not yet expired.
ALTER TABLE certificates ADD COLUMN revocation_reason TEXT NOT NULL DEFAULT '';
CREATE INDEX certificates_revoked ON certificates(not_after) WHERE revoked_at IS NOT NULL;
