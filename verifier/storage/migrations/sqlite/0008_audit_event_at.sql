-- The audit's entries of one event in a time range, in time order, without reading the rest
-- (issue 13, `devtrust report`: the period's appraisals, the devices revoked; review H1):
-- without it every such read scans the whole audit history.
CREATE INDEX audit_event_at ON audit(event, at);
