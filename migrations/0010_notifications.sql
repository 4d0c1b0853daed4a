-- Who receives an account's emails and which kinds are sent.
CREATE TABLE notification_settings (
    account_id     TEXT PRIMARY KEY REFERENCES accounts (account_id),
    -- Empty: the account's billing email.
    recipients     TEXT[] NOT NULL DEFAULT '{}',
    -- Kinds switched off; new kinds are on by default.
    disabled_kinds TEXT[] NOT NULL DEFAULT '{}',
    updated_at     TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- The outbox: one row per message, written in the transaction that decided
-- to send it. `dedupe_key` makes a decision taken twice produce one message.
CREATE TABLE notifications (
    seq             BIGSERIAL UNIQUE,
    notification_id UUID PRIMARY KEY,
    account_id      TEXT NOT NULL REFERENCES accounts (account_id),
    kind            TEXT NOT NULL,
    dedupe_key      TEXT NOT NULL UNIQUE,
    recipients      TEXT[] NOT NULL,
    subject         TEXT NOT NULL,
    body_text       TEXT NOT NULL,
    status          TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'sent', 'failed')),
    attempts        INT NOT NULL DEFAULT 0,
    last_error      TEXT,
    next_attempt_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    sent_at         TIMESTAMPTZ
);
CREATE INDEX notifications_due ON notifications (next_attempt_at) WHERE status = 'pending';
CREATE INDEX notifications_by_account ON notifications (account_id, seq DESC);
