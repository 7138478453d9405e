-- A retry is an outbox row with a delay: the relay publishes it to the delay queue
-- whose TTL fits, and the broker dead-letters it back to the work queue when it ends.
ALTER TABLE outbox ADD COLUMN delay_ms integer NOT NULL DEFAULT 0;
