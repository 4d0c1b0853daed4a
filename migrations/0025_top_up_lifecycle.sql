-- The top-up lifecycle on live state (one charge path for manual, retry and
-- automatic top-ups), a per-account crossing state, and bounded reconciliation.

-- New terminal states: CANCELED (an automatic top-up no longer wanted:
-- auto refill switched off, or the balance restored) and NEEDS_ATTENTION (an
-- outcome that could not be reconciled, or a charge that could not be credited).
ALTER TABLE top_ups DROP CONSTRAINT IF EXISTS top_ups_status_check;
ALTER TABLE top_ups ADD CONSTRAINT top_ups_status_check CHECK (status IN
    ('PENDING', 'SUCCEEDED', 'RETRY_SCHEDULED', 'FAILED', 'REQUIRES_ACTION', 'UNKNOWN',
     'CAP_REACHED', 'CANCELED', 'NEEDS_ATTENTION'));

-- A crossing may need several automatic top-ups (a chain, when usage arrived
-- meanwhile); one open automatic top-up per account is the rule instead.
ALTER TABLE top_ups DROP CONSTRAINT IF EXISTS top_ups_account_id_crossing_key_key;
CREATE UNIQUE INDEX top_ups_one_open_automatic ON top_ups (account_id)
    WHERE trigger = 'AUTOMATIC' AND status IN ('PENDING', 'RETRY_SCHEDULED', 'UNKNOWN');
DROP INDEX IF EXISTS top_ups_automatic_open;

-- How many times the gateway was asked about an unknown outcome (bounded).
ALTER TABLE top_ups ADD COLUMN reconcile_tries INT NOT NULL DEFAULT 0;
CREATE INDEX top_ups_due_any ON top_ups (COALESCE(next_attempt_at, created_at))
    WHERE status IN ('PENDING', 'RETRY_SCHEDULED', 'UNKNOWN');

-- The 3-D Secure challenge an attempt was answered with (automatic rounds
-- fall through to the next card and remember it).
ALTER TABLE top_up_attempts
    ADD COLUMN challenge_id  TEXT,
    ADD COLUMN challenge_url TEXT;

-- The crossing state of each account's auto top-up, changed only under the
-- account row lock: ARMED (above the threshold, or never crossed) or BELOW
-- (crossing `crossing_id` is being handled). `resume_at`: when a cap stopped
-- the crossing's chain, the moment the rolling window allows it again.
CREATE TABLE top_up_crossings (
    account_id  TEXT PRIMARY KEY REFERENCES accounts (account_id),
    state       TEXT NOT NULL CHECK (state IN ('ARMED', 'BELOW')),
    crossing_id TEXT,
    resume_at   TIMESTAMPTZ,
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX top_up_crossings_resume ON top_up_crossings (resume_at) WHERE resume_at IS NOT NULL;

-- The account version (event sequence) the crossing state was decided at: an
-- event at or below it is older than what the state already reflects (a
-- live-state decision of Apply, the chain or the engine) and changes nothing.
ALTER TABLE top_up_crossings ADD COLUMN as_of_version BIGINT NOT NULL DEFAULT 0;

-- Top-ups waiting for the customer, by age (the engine's expiry pass runs every poll).
CREATE INDEX top_ups_waiting_for_action ON top_ups (updated_at) WHERE status = 'REQUIRES_ACTION';
