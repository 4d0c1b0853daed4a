-- Locks the account and, in the same round trip, reads the batch's keys
-- already used on it and takes one entry id per debit.
-- $1 account_id, $2 the batch's idempotency keys, $3 batch length.
-- The entry ids are taken once the lock is held (a sub-select correlated to
-- the locked row), so entry order always follows the account's sequence,
-- whoever held the lock before.
-- The key subquery reads the statement's snapshot: when the lock had to wait
-- for another transaction, a key that one stored may be missing here. The
-- write inserts keys with ON CONFLICT DO NOTHING and counts them, so such a
-- batch is noticed, rolled back and redone with a fresh read (`lookup` in
-- batch.rs). A refusal is never answered from this read: a batch that would
-- refuse a debit reads its keys again first (the key may belong to a retry
-- that the transaction the lock waited for has just committed).
WITH locked AS (
    SELECT a.account_id, a.currency, a.display_name, a.billing_email, a.balance, a.credit_limit,
           a.version, a.created_at, now() AS now
      FROM accounts a
     WHERE a.account_id = $1
       FOR UPDATE OF a
)
SELECT locked.*,
       ARRAY(SELECT nextval('ledger_entries_entry_id_seq') FROM generate_series(1, $3)
              WHERE locked.version >= 0) AS entry_ids,
       (SELECT json_agg(json_build_array(k.idempotency_key, k.operation, k.request_hash, k.response))::TEXT
          FROM idempotency_keys k
         WHERE k.account_id = $1 AND k.idempotency_key = ANY($2)) AS stored_keys
  FROM locked
