-- The trace a job's message continues (W3C traceparent), published as an AMQP header.
ALTER TABLE outbox ADD COLUMN traceparent text;

-- Dead letters are counted on every metrics scrape and admin queues call.
CREATE INDEX jobs_dead_lettered_idx ON jobs (finished_at DESC)
    WHERE status = 'failed' AND error->>'code' = 'dead_lettered';
