-- Idempotency-Key on POST /v1/analyze: one row per (user, key), written in the same
-- transaction as the job it created, so a retried request finds the original job.
CREATE TABLE idempotency_keys (
    user_id      uuid        NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    key          text        NOT NULL,
    -- SHA-256 of the request body as parsed: the same key with another body is refused.
    request_hash bytea       NOT NULL,
    job_id       uuid        NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, key)
);
CREATE INDEX idempotency_keys_created_at_idx ON idempotency_keys (created_at);
