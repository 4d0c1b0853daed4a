-- Moves the balance, appends the ledger entry and its balance event, in one round trip.
-- $1 account_id, $2 new balance, $3 transaction_id, $4 entry kind, $5 signed amount,
-- $6 description, $7 metadata, $8 idempotency key, $9 event kind, $10 new total balance
WITH moved AS (
    UPDATE accounts
       SET balance = $2, version = version + 1
     WHERE account_id = $1
 RETURNING version
), entry AS (
    INSERT INTO ledger_entries (transaction_id, account_id, kind, amount, balance_after, description, metadata, idempotency_key)
    VALUES ($3, $1, $4, $5, $2, $6, $7, $8)
 RETURNING entry_id, created_at
), event AS (
    INSERT INTO balance_events (account_id, sequence, kind, amount, balance_after, total_balance_after, transaction_id, created_at)
    SELECT $1, moved.version, $9, $5, $2, $10, $3, entry.created_at FROM moved, entry
 RETURNING cursor
)
SELECT moved.version, entry.entry_id, entry.created_at, event.cursor
  FROM moved, entry, event
