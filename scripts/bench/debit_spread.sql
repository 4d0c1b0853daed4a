-- pgbench: the SQL of one debit (balance update + ledger row + event row) in
-- one autocommit statement, on a random one of the 10,000 bench accounts.
\set n random(0, 9999)
WITH moved AS (
    UPDATE accounts SET balance = balance - 0.01, version = version + 1
     WHERE account_id = 'bench-' || lpad(:n::text, 5, '0')
 RETURNING account_id, balance, credit_limit, version
), entry AS (
    INSERT INTO ledger_entries (transaction_id, account_id, kind, amount, balance_after, description, idempotency_key)
    SELECT gen_random_uuid(), account_id, 'usage', -0.01, balance, 'pgbench', md5(random()::text) FROM moved
 RETURNING transaction_id, created_at
)
INSERT INTO balance_events (account_id, sequence, kind, amount, balance_after, total_balance_after, transaction_id, created_at)
SELECT m.account_id, m.version, 'debited', -0.01, m.balance, m.balance + m.credit_limit, e.transaction_id, e.created_at
  FROM moved m, entry e;
