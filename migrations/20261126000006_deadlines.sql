-- Every job has a deadline: past it, it fails `deadline_exceeded`.
ALTER TABLE jobs ADD COLUMN deadline_at timestamptz;
