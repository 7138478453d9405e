-- The feeder walks the active batches in id order (`lock_next_active`), which the
-- index on `created_at` did not serve; a batch's end reads all its jobs, finished
-- ones too, which the index of queued and running batch jobs does not hold.
DROP INDEX batches_active_idx;
CREATE INDEX batches_active_idx ON batches (id) WHERE status IN ('in_progress', 'cancelling');
CREATE INDEX jobs_batch_idx ON jobs (batch_id) WHERE batch_id IS NOT NULL;
