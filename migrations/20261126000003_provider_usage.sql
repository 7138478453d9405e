-- Cost per step (in millionths of a US dollar, from the catalog's prices) and whether
-- the answer came from the response cache; cost per user per day.
ALTER TABLE job_steps ADD COLUMN cost_micros bigint NOT NULL DEFAULT 0;
ALTER TABLE job_steps ADD COLUMN cached boolean NOT NULL DEFAULT false;
ALTER TABLE usage_daily ADD COLUMN cost_micros bigint NOT NULL DEFAULT 0;
