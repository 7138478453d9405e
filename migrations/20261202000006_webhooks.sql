-- Webhooks (Standard Webhooks): a user's endpoints, and the deliveries owed to them.
-- A delivery row is written in the transaction that ends its job or batch (an
-- outbox), so a crash cannot lose one; the workers' delivery task sends and retries it.

CREATE TABLE webhook_endpoints (
    id uuid PRIMARY KEY,
    user_id uuid NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    url text NOT NULL,
    -- The event types sent here; NULL: every type.
    events text[],
    enabled boolean NOT NULL DEFAULT true,
    -- `whsec_…`. After a rotation the previous secret signs too, until it expires.
    secret text NOT NULL,
    previous_secret text,
    previous_secret_expires_at timestamptz,
    -- Since when every attempt has failed (NULL after a success); past
    -- ULTRA_WEBHOOK_DISABLE_AFTER_SECS the endpoint is disabled with a reason.
    failing_since timestamptz,
    disabled_at timestamptz,
    disabled_reason text,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX webhook_endpoints_user_idx ON webhook_endpoints (user_id, created_at);

CREATE TABLE webhook_deliveries (
    id uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    endpoint_id uuid NOT NULL REFERENCES webhook_endpoints (id) ON DELETE CASCADE,
    -- A job's one-off `webhook_url`; NULL: the endpoint's own URL.
    url text,
    event_type text NOT NULL,
    -- The exact bytes signed and sent, the same on every attempt.
    body text NOT NULL,
    status text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'succeeded', 'failed')),
    attempts int NOT NULL DEFAULT 0,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    -- Set while a delivery task sends it; a task that dies leaves a claim that lapses.
    claimed_until timestamptz,
    last_attempt_at timestamptz,
    last_status_code int,
    last_latency_ms int,
    last_error text,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    finished_at timestamptz
);
CREATE INDEX webhook_deliveries_due_idx ON webhook_deliveries (next_attempt_at) WHERE status = 'pending';
CREATE INDEX webhook_deliveries_endpoint_idx ON webhook_deliveries (endpoint_id, created_at DESC, id DESC);
-- Housekeeping deletes ended deliveries past their retention.
CREATE INDEX webhook_deliveries_ended_idx ON webhook_deliveries (finished_at) WHERE status <> 'pending';
-- The claim counts each endpoint's deliveries in flight.
CREATE INDEX webhook_deliveries_claimed_idx ON webhook_deliveries (endpoint_id)
    WHERE status = 'pending' AND claimed_until IS NOT NULL;
