-- Accounts: refresh tokens, daily usage and budget reservations.

-- Opaque refresh tokens, stored as SHA-256. Each login starts a family; every refresh
-- replaces the token with a new one of the same family. Presenting a token that was
-- already replaced means it was stolen (or replayed): the whole family is revoked.
CREATE TABLE refresh_tokens (
    id          uuid        PRIMARY KEY,
    user_id     uuid        NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    family_id   uuid        NOT NULL,
    token_hash  bytea       NOT NULL UNIQUE,
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz NOT NULL,
    replaced_at timestamptz,
    revoked_at  timestamptz
);
CREATE INDEX refresh_tokens_family_idx ON refresh_tokens (family_id);
CREATE INDEX refresh_tokens_user_idx ON refresh_tokens (user_id);

-- Tokens per user per UTC day: `reserved` is held by accepted jobs until they end
-- (their worst case), `used` is what finished jobs actually consumed.
CREATE TABLE usage_daily (
    user_id  uuid   NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    day      date   NOT NULL,
    reserved bigint NOT NULL DEFAULT 0 CHECK (reserved >= 0),
    used     bigint NOT NULL DEFAULT 0 CHECK (used >= 0),
    jobs     bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (user_id, day)
);

-- What a job reserved, so completion can release exactly that.
ALTER TABLE jobs ADD COLUMN reserved_tokens bigint NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN reserved_day date;
CREATE INDEX jobs_user_active_idx ON jobs (user_id) WHERE status IN ('queued', 'running');
