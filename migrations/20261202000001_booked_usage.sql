-- What a job's steps have already been booked into `usage_daily`: a dead-lettered
-- job that an administrator replays ends a second time, and must book only what its
-- steps used since, not its finished steps again.
ALTER TABLE jobs
    ADD COLUMN booked_tokens bigint NOT NULL DEFAULT 0,
    ADD COLUMN booked_cost_micros bigint NOT NULL DEFAULT 0;
