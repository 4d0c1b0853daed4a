-- The bare debit of issue 18, item 5: the least a debit can be in Postgres —
-- a balance, a version, a ledger row with a unique key per account, no
-- triggers, no events, no audit. 10,000 accounts funded for any run.
DROP TABLE IF EXISTS ledger, accounts;
CREATE TABLE accounts (id BIGINT PRIMARY KEY, balance NUMERIC(20, 6), version BIGINT);
CREATE TABLE ledger (
    id              BIGSERIAL PRIMARY KEY,
    account_id      BIGINT REFERENCES accounts,
    seq             BIGINT,
    amount          NUMERIC(20, 6),
    balance_after   NUMERIC(20, 6),
    idempotency_key TEXT,
    created_at      TIMESTAMPTZ DEFAULT now(),
    UNIQUE (account_id, idempotency_key)
);
INSERT INTO accounts SELECT g, 1000000000, 0 FROM generate_series(1, 10000) AS g;
VACUUM ANALYZE accounts;
