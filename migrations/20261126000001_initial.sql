-- Ultra's system of record. PostgreSQL holds every accepted job, its steps and its
-- events; RabbitMQ and Redis only carry pointers and live copies.

-- Users are designed for the account system to come: passwords (Argon2id PHC
-- strings), tiers and roles live here from the start so later issues only add code.
CREATE TABLE users (
    id            uuid        PRIMARY KEY,
    email         text        NOT NULL,
    password_hash text,
    role          text        NOT NULL DEFAULT 'user' CHECK (role IN ('user', 'admin')),
    tier          text        NOT NULL DEFAULT 'free',
    disabled_at   timestamptz,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);
-- Emails are stored normalised (trimmed, lower-case); the index enforces it anyway.
CREATE UNIQUE INDEX users_email_key ON users (lower(email));

-- API keys are shown once and stored as a SHA-256 of the whole key; `prefix` is the
-- public part used to find the row (and to recognise a key in logs or leak scans).
CREATE TABLE api_keys (
    id           uuid        PRIMARY KEY,
    user_id      uuid        NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    name         text        NOT NULL,
    prefix       text        NOT NULL UNIQUE,
    key_hash     bytea       NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    last_used_at timestamptz,
    revoked_at   timestamptz
);
CREATE INDEX api_keys_user_id_idx ON api_keys (user_id);

CREATE TABLE jobs (
    -- UUIDv7: time-ordered, so "newest first" and cursors use the primary key.
    id             uuid        PRIMARY KEY,
    user_id        uuid        NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    status         text        NOT NULL DEFAULT 'queued'
                   CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    pattern        text        NOT NULL,
    prompt         text        NOT NULL,
    models         text[]      NOT NULL,
    options        jsonb       NOT NULL DEFAULT '{}',
    result         jsonb,
    error          jsonb,
    attempts       integer     NOT NULL DEFAULT 0,
    -- Per-job event counter: bumping it in the event's transaction makes sequence
    -- numbers gapless and commit-ordered (the job row lock serialises writers).
    last_event_seq bigint      NOT NULL DEFAULT 0,
    created_at     timestamptz NOT NULL DEFAULT now(),
    started_at     timestamptz,
    finished_at    timestamptz,
    updated_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX jobs_user_id_id_idx ON jobs (user_id, id DESC);
CREATE INDEX jobs_user_id_status_id_idx ON jobs (user_id, status, id DESC);

-- One row per provider call `(job, stage, model)`: a finished step is never run again.
CREATE TABLE job_steps (
    job_id        uuid        NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    stage         text        NOT NULL,
    model         text        NOT NULL,
    status        text        NOT NULL CHECK (status IN ('running', 'succeeded', 'failed')),
    output        text,
    input_tokens  integer,
    output_tokens integer,
    error         jsonb,
    started_at    timestamptz NOT NULL DEFAULT now(),
    finished_at   timestamptz,
    PRIMARY KEY (job_id, stage, model)
);

-- Every lifecycle event, numbered 1, 2, 3, … per job: the source SSE replays from.
CREATE TABLE job_events (
    job_id     uuid        NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    seq        bigint      NOT NULL,
    kind       text        NOT NULL,
    data       jsonb       NOT NULL DEFAULT '{}',
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job_id, seq)
);

-- Transactional outbox: written with the job, deleted once RabbitMQ confirms the
-- message. Whatever the api's fast-path publish misses, the relay publishes.
CREATE TABLE outbox (
    id         bigserial   PRIMARY KEY,
    job_id     uuid        NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    attempt    integer     NOT NULL DEFAULT 1,
    created_at timestamptz NOT NULL DEFAULT now()
);
