-- Payment methods, top-ups with their attempts, and the sandbox gateway's own state.
-- No table holds a full card number or a CVC: only the gateway token, brand,
-- last 4, expiry and a salted fingerprint.

CREATE TABLE payment_methods (
    payment_method_id   TEXT PRIMARY KEY,
    account_id          TEXT NOT NULL REFERENCES accounts (account_id),
    status              TEXT NOT NULL CHECK (status IN
                            ('PENDING_AUTHENTICATION', 'ACTIVE', 'TEMPORARILY_DISABLED', 'FAILED', 'REMOVED')),
    brand               TEXT NOT NULL,
    last4               TEXT NOT NULL CHECK (length(last4) = 4),
    exp_month           INT NOT NULL CHECK (exp_month BETWEEN 1 AND 12),
    exp_year            INT NOT NULL,
    holder_name         TEXT NOT NULL DEFAULT '',
    address_line1       TEXT NOT NULL DEFAULT '',
    address_line2       TEXT NOT NULL DEFAULT '',
    address_city        TEXT NOT NULL DEFAULT '',
    address_postal_code TEXT NOT NULL DEFAULT '',
    address_state       TEXT NOT NULL DEFAULT '',
    address_country     TEXT NOT NULL DEFAULT '',
    gateway             TEXT NOT NULL,
    gateway_token       TEXT NOT NULL,
    fingerprint         TEXT NOT NULL,
    auto_charge         BOOLEAN NOT NULL,
    -- 1 = tried first; removed methods keep 0.
    priority            INT NOT NULL,
    disabled_reason     TEXT NOT NULL DEFAULT '',
    -- The open 3-D Secure challenge of a PENDING_AUTHENTICATION method.
    challenge_id        TEXT,
    challenge_url       TEXT,
    created_at          TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at          TIMESTAMPTZ NOT NULL DEFAULT now(),
    removed_at          TIMESTAMPTZ
);
CREATE INDEX payment_methods_by_account ON payment_methods (account_id, priority);
-- One live copy of a card per account (duplicate detection by fingerprint).
CREATE UNIQUE INDEX payment_methods_one_live_card ON payment_methods (account_id, fingerprint)
    WHERE status NOT IN ('REMOVED', 'FAILED');

-- Every charge of an account's cards: manual (Add Funds), retry, and automatic (the top-up engine).
CREATE TABLE top_ups (
    top_up_id         TEXT PRIMARY KEY,
    -- Paging order.
    top_up_seq        BIGSERIAL NOT NULL UNIQUE,
    account_id        TEXT NOT NULL REFERENCES accounts (account_id),
    trigger           TEXT NOT NULL CHECK (trigger IN ('AUTOMATIC', 'MANUAL', 'RETRY')),
    status            TEXT NOT NULL CHECK (status IN
                          ('PENDING', 'SUCCEEDED', 'RETRY_SCHEDULED', 'FAILED', 'REQUIRES_ACTION', 'UNKNOWN', 'CAP_REACHED')),
    amount            NUMERIC(24, 6) NOT NULL CHECK (amount > 0),
    currency          CHAR(3) NOT NULL,
    -- The method asked for (manual and retry); NULL = by charge priority (automatic).
    payment_method_id TEXT REFERENCES payment_methods (payment_method_id),
    -- Automatic top-ups: one per low-balance crossing, whatever the number of replicas.
    crossing_key      TEXT,
    -- The ledger transaction credited on success.
    transaction_id    UUID,
    failure_reason    TEXT NOT NULL DEFAULT '',
    next_attempt_at   TIMESTAMPTZ,
    challenge_id      TEXT,
    challenge_url     TEXT,
    created_at        TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at        TIMESTAMPTZ NOT NULL DEFAULT now(),
    UNIQUE (account_id, crossing_key)
);
CREATE INDEX top_ups_by_account ON top_ups (account_id, top_up_seq DESC);
CREATE INDEX top_ups_due ON top_ups (next_attempt_at) WHERE status = 'RETRY_SCHEDULED';

-- One gateway call per attempt; its idempotency key is derived from the top-up id and the attempt number.
CREATE TABLE top_up_attempts (
    top_up_id               TEXT NOT NULL REFERENCES top_ups (top_up_id),
    attempt_number          INT NOT NULL CHECK (attempt_number > 0),
    payment_method_id       TEXT NOT NULL REFERENCES payment_methods (payment_method_id),
    outcome                 TEXT NOT NULL CHECK (outcome IN ('SUCCEEDED', 'DECLINED', 'REQUIRES_ACTION', 'UNKNOWN')),
    decline_code            TEXT NOT NULL DEFAULT '',
    hard_decline            BOOLEAN NOT NULL DEFAULT false,
    amount                  NUMERIC(24, 6) NOT NULL CHECK (amount > 0),
    gateway_idempotency_key TEXT NOT NULL UNIQUE,
    gateway_charge_id       TEXT,
    attempted_at            TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (top_up_id, attempt_number)
);

-- The sandbox gateway: a simulated card processor. `behaviour` is the
-- documented behaviour of the test card it was set up with.
CREATE TABLE sandbox_cards (
    token        TEXT PRIMARY KEY,
    brand        TEXT NOT NULL,
    last4        TEXT NOT NULL,
    exp_month    INT NOT NULL,
    exp_year     INT NOT NULL,
    fingerprint  TEXT NOT NULL,
    behaviour    TEXT NOT NULL,
    -- 'requires_action', 'succeeded' or 'failed'.
    setup_status TEXT NOT NULL,
    challenge_id TEXT,
    detached_at  TIMESTAMPTZ,
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Charges keyed by the caller's idempotency key: a repeated key returns the same charge.
CREATE TABLE sandbox_charges (
    charge_id       TEXT PRIMARY KEY,
    idempotency_key TEXT NOT NULL UNIQUE,
    token           TEXT NOT NULL REFERENCES sandbox_cards (token),
    amount          NUMERIC(24, 6) NOT NULL,
    currency        CHAR(3) NOT NULL,
    off_session     BOOLEAN NOT NULL,
    -- 'succeeded', 'declined' or 'requires_action'.
    outcome         TEXT NOT NULL,
    decline_code    TEXT NOT NULL DEFAULT '',
    hard_decline    BOOLEAN NOT NULL DEFAULT false,
    challenge_id    TEXT,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now()
);
