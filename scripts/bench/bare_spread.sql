-- pgbench: the bare debit (bare_schema.sql) on a random one of 10,000 accounts.
\set aid random(1, 10000)
BEGIN;
WITH a AS (
    UPDATE accounts SET balance = balance - 0.0035, version = version + 1
     WHERE id = :aid AND balance - 0.0035 >= 0
 RETURNING id, balance, version
)
INSERT INTO ledger (account_id, seq, amount, balance_after, idempotency_key)
SELECT id, version, -0.0035, balance, md5(random()::text) FROM a;
COMMIT;
