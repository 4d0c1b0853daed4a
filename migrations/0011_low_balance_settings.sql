-- The Low Balance Settings panel, per account. No row: everything off.
CREATE TABLE low_balance_settings (
    account_id             TEXT PRIMARY KEY REFERENCES accounts (account_id),
    auto_refill_enabled    BOOLEAN NOT NULL DEFAULT false,
    threshold              NUMERIC(24, 6) NOT NULL DEFAULT 0 CHECK (threshold >= 0),
    refill_amount          NUMERIC(24, 6) NOT NULL DEFAULT 0 CHECK (refill_amount >= 0),
    notification_enabled   BOOLEAN NOT NULL DEFAULT false,
    notification_threshold NUMERIC(24, 6) NOT NULL DEFAULT 0 CHECK (notification_threshold >= 0),
    max_top_ups_per_day    INT NOT NULL CHECK (max_top_ups_per_day > 0),
    -- NULL: no amount cap.
    max_amount_per_day     NUMERIC(24, 6) CHECK (max_amount_per_day > 0),
    updated_at             TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- The engine's bookkeeping on automatic top-ups: rounds of attempts over
-- every method, and a lease so one replica at a time drives a top-up
-- without holding a transaction open during gateway calls.
ALTER TABLE top_ups
    ADD COLUMN rounds      INT NOT NULL DEFAULT 0,
    ADD COLUMN lease_until TIMESTAMPTZ,
    ADD COLUMN lease_owner UUID;
CREATE INDEX top_ups_automatic_open ON top_ups (account_id)
    WHERE trigger = 'AUTOMATIC' AND status IN ('PENDING', 'RETRY_SCHEDULED', 'UNKNOWN');

-- Card-expiry reminders already queued (one per card and expiry).
CREATE TABLE card_expiry_reminders (
    payment_method_id TEXT PRIMARY KEY REFERENCES payment_methods (payment_method_id),
    created_at        TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Which round of an automatic top-up an attempt belongs to (manual: 0).
ALTER TABLE top_up_attempts ADD COLUMN round INT NOT NULL DEFAULT 0;
