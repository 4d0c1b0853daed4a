-- Locks every account of a batch, in account id order, and in the same round
-- trip reads the batch's keys already used on them and takes one entry id
-- per debit. One row per account found (a missing account has no row).
-- $1 each debit's account_id, $2 each debit's idempotency key (same length),
-- $3 the batch's accounts, each once: the planner then counts the accounts,
-- not the debits (it counted 64 for one account's 64 debits and locked that
-- one row through a scan of the whole accounts table).
-- Lock order: every batch of every replica locks its accounts sorted by id
-- (the sort runs below the row locking), so two batches with overlapping
-- accounts wait for each other and never deadlock.
-- The entry ids are taken once an account's lock is held (a sub-select
-- correlated to the locked row), so each account's entry order follows its
-- sequence, whoever held its lock before.
-- The key subquery reads the statement's snapshot: when a lock had to wait
-- for another transaction, a key that one stored may be missing here. The
-- write inserts keys with ON CONFLICT DO NOTHING and counts them, so such a
-- batch is noticed, rolled back and redone with a fresh read (`lookup` in
-- batch.rs). A refusal is never answered from this read: a batch that would
-- refuse a debit reads its keys again first (the key may belong to a retry
-- that the transaction the lock waited for has just committed).
WITH wanted AS (
    SELECT d.account_id, count(*) AS debits, array_agg(d.idempotency_key) AS keys
      FROM unnest($1::TEXT[], $2::TEXT[]) AS d (account_id, idempotency_key)
     GROUP BY d.account_id
), locked AS MATERIALIZED (
    SELECT a.account_id, a.currency, a.display_name, a.billing_email, a.balance, a.credit_limit,
           a.version, a.created_at, now() AS now
      FROM accounts a
     WHERE a.account_id = ANY($3::TEXT[])
     ORDER BY a.account_id
       FOR UPDATE OF a
)
SELECT locked.*,
       ARRAY(SELECT nextval('ledger_entries_entry_id_seq') FROM generate_series(1, wanted.debits)
              WHERE locked.version >= 0) AS entry_ids,
       (SELECT json_agg(json_build_array(k.idempotency_key, k.operation, k.request_hash, k.response))::TEXT
          FROM idempotency_keys k
         WHERE k.account_id = locked.account_id AND k.idempotency_key = ANY(wanted.keys)) AS stored_keys
  FROM locked JOIN wanted ON wanted.account_id = locked.account_id
