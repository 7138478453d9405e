-- A running job is leased to one worker, which renews the lease while it works. A
-- lease that expires means the worker is gone: the reaper returns the job to the queue.
ALTER TABLE jobs ADD COLUMN lease_owner uuid;
ALTER TABLE jobs ADD COLUMN lease_until timestamptz;
CREATE INDEX jobs_running_lease_idx ON jobs (lease_until) WHERE status = 'running';
