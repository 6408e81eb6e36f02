-- Revocation (issue 10; sqlite/0004): a revoked certificate's reason, and the revoked ones
-- not yet expired found by index.
ALTER TABLE certificates ADD COLUMN revocation_reason TEXT COLLATE "C" NOT NULL DEFAULT '';
CREATE INDEX certificates_revoked ON certificates(not_after) WHERE revoked_at IS NOT NULL;
