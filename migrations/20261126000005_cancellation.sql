-- Cancellation of a running job is a request the worker running it acts on.
ALTER TABLE jobs ADD COLUMN cancel_requested_at timestamptz;
