-- The relay claims a batch of outbox rows for a while (instead of holding their row
-- locks in an open transaction) while it publishes them all and waits for the
-- broker's confirms together; another relay skips rows whose claim is live.
ALTER TABLE outbox ADD COLUMN claimed_until timestamptz;
