-- The ledger: accounts, immutable entries, balance events, idempotency and audit.

CREATE TABLE accounts (
    account_id    TEXT PRIMARY KEY,
    currency      CHAR(3) NOT NULL,
    display_name  TEXT NOT NULL DEFAULT '',
    billing_email TEXT NOT NULL DEFAULT '',
    -- Kept equal to the sum of the account's ledger entries, in the same transaction.
    balance       NUMERIC(24, 6) NOT NULL DEFAULT 0,
    credit_limit  NUMERIC(24, 6) NOT NULL DEFAULT 0 CHECK (credit_limit >= 0),
    -- Number of ledger entries; also the per-account event sequence.
    version       BIGINT NOT NULL DEFAULT 0,
    created_at    TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE TABLE ledger_entries (
    entry_id        BIGSERIAL PRIMARY KEY,
    transaction_id  UUID NOT NULL UNIQUE,
    account_id      TEXT NOT NULL REFERENCES accounts (account_id),
    kind            TEXT NOT NULL CHECK (kind IN ('usage', 'adjustment', 'refund', 'promotion', 'top_up')),
    amount          NUMERIC(24, 6) NOT NULL CHECK (amount <> 0),
    balance_after   NUMERIC(24, 6) NOT NULL,
    description     TEXT NOT NULL DEFAULT '',
    metadata        JSONB NOT NULL DEFAULT '{}',
    idempotency_key TEXT,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX ledger_entries_by_account ON ledger_entries (account_id, entry_id DESC);

CREATE FUNCTION refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% is append-only', TG_TABLE_NAME;
END
$$;
CREATE TRIGGER ledger_entries_are_immutable
    BEFORE UPDATE OR DELETE ON ledger_entries
    FOR EACH ROW EXECUTE FUNCTION refuse_change();

-- One event per ledger entry, written in the same transaction. `cursor` is the
-- global order; `writer_xid` lets readers wait until every lower cursor is visible.
CREATE TABLE balance_events (
    cursor              BIGSERIAL PRIMARY KEY,
    account_id          TEXT NOT NULL REFERENCES accounts (account_id),
    sequence            BIGINT NOT NULL,
    kind                TEXT NOT NULL,
    amount              NUMERIC(24, 6) NOT NULL,
    balance_after       NUMERIC(24, 6) NOT NULL,
    total_balance_after NUMERIC(24, 6) NOT NULL,
    transaction_id      UUID NOT NULL,
    created_at          TIMESTAMPTZ NOT NULL DEFAULT now(),
    writer_xid          XID8 NOT NULL DEFAULT pg_current_xact_id(),
    UNIQUE (account_id, sequence)
);
CREATE TRIGGER balance_events_are_immutable
    BEFORE UPDATE OR DELETE ON balance_events
    FOR EACH ROW EXECUTE FUNCTION refuse_change();

-- The first result of every idempotent request, per account and key.
CREATE TABLE idempotency_keys (
    account_id      TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,
    operation       TEXT NOT NULL,
    request_hash    TEXT NOT NULL,
    response        JSONB NOT NULL,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (account_id, idempotency_key)
);

-- Who changed what, when.
CREATE TABLE audit_log (
    audit_id   BIGSERIAL PRIMARY KEY,
    actor      TEXT NOT NULL,
    role       TEXT NOT NULL,
    action     TEXT NOT NULL,
    account_id TEXT,
    details    JSONB NOT NULL DEFAULT '{}',
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX audit_log_by_account ON audit_log (account_id, audit_id DESC);
