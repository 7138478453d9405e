-- The OpenAI Batch API: uploaded files, batches, and one row per input line, each
-- of which becomes a job (`jobs.batch_id`) as the batch feeder admits it.

CREATE TABLE files (
    id uuid PRIMARY KEY,
    user_id uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    -- `batch` (uploaded), `batch_output` (a batch's results and errors).
    purpose text NOT NULL,
    filename text NOT NULL,
    bytes bigint NOT NULL,
    content bytea NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX files_user_idx ON files (user_id, id DESC);
CREATE INDEX files_created_at_idx ON files (created_at);

CREATE TABLE batches (
    id uuid PRIMARY KEY,
    user_id uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    -- No foreign key: the input file may be deleted while the batch stays.
    input_file_id uuid NOT NULL,
    endpoint text NOT NULL,
    completion_window text NOT NULL,
    status text NOT NULL,
    metadata jsonb,
    -- The input's validation errors, for a batch that failed validation.
    errors jsonb,
    output_file_id uuid,
    error_file_id uuid,
    total integer NOT NULL DEFAULT 0,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL,
    in_progress_at timestamptz,
    finalizing_at timestamptz,
    completed_at timestamptz,
    failed_at timestamptz,
    cancelling_at timestamptz,
    cancelled_at timestamptz,
    expired_at timestamptz
);
CREATE INDEX batches_user_idx ON batches (user_id, id DESC);
CREATE INDEX batches_active_idx ON batches (created_at) WHERE status IN ('in_progress', 'cancelling');

CREATE TABLE batch_lines (
    batch_id uuid NOT NULL REFERENCES batches (id) ON DELETE CASCADE,
    -- 1-based, as the input file numbers its lines.
    line integer NOT NULL,
    custom_id text NOT NULL,
    -- The request's `body`: a chat completion request.
    body jsonb NOT NULL,
    job_id uuid,
    -- Why the line never became a job (it was refused, or the batch ended first).
    error jsonb,
    PRIMARY KEY (batch_id, line)
);
CREATE INDEX batch_lines_pending_idx ON batch_lines (batch_id, line) WHERE job_id IS NULL AND error IS NULL;

ALTER TABLE jobs ADD COLUMN batch_id uuid;
-- Interactive work waiting, which batch lines yield to.
CREATE INDEX jobs_interactive_queued_idx ON jobs (created_at) WHERE status = 'queued' AND batch_id IS NULL;
CREATE INDEX jobs_batch_active_idx ON jobs (batch_id) WHERE batch_id IS NOT NULL AND status IN ('queued', 'running');
