-- The accepted debits of a batch, over any number of locked accounts, in one
-- round trip: each account's balance and version move once; each debit
-- appends its entry, its balance event (in the order of the arrays: by
-- account, then sequence, so each account's cursors follow its sequences),
-- its idempotency key with the stored response, and its audit row.
-- `keys_stored` below the number of debits means another transaction stored
-- one of the keys first; `accounts_moved` below the number of accounts means
-- an account vanished (it cannot: it is locked).
-- Per account: $1 account_id, $2 final balance, $3 final version.
-- $4 created_at (the transaction's now()).
-- Per debit: $5 account_id, $6 entry_id, $7 transaction_id, $8 signed amount,
-- $9 balance_after, $10 total_balance_after, $11 sequence, $12 description,
-- $13 metadata, $14 idempotency key, $15 request hash, $16 stored response,
-- $17 actor, $18 role, $19 audit details, $20 actor type, $21 trace id
WITH moved AS (
    UPDATE accounts a
       SET balance = m.balance, version = m.version
      FROM unnest($1::TEXT[], $2::NUMERIC[], $3::BIGINT[]) AS m (account_id, balance, version)
     WHERE a.account_id = m.account_id
 RETURNING 1
), batch AS (
    SELECT *
      FROM unnest($5::TEXT[], $6::BIGINT[], $7::UUID[], $8::NUMERIC[], $9::NUMERIC[], $10::NUMERIC[],
                  $11::BIGINT[], $12::TEXT[], $13::TEXT[], $14::TEXT[], $15::TEXT[], $16::TEXT[],
                  $17::TEXT[], $18::TEXT[], $19::TEXT[], $20::TEXT[], $21::TEXT[]) WITH ORDINALITY
        AS b (account_id, entry_id, transaction_id, amount, balance_after, total_balance_after, sequence,
              description, metadata, idempotency_key, request_hash, response, actor, role, details,
              actor_type, trace_id, position)
), entries AS (
    INSERT INTO ledger_entries (entry_id, transaction_id, account_id, kind, amount, balance_after, description, metadata, idempotency_key, created_at)
    SELECT entry_id, transaction_id, account_id, 'usage', amount, balance_after, description, metadata::JSONB, idempotency_key, $4
      FROM batch ORDER BY position
), events AS (
    INSERT INTO balance_events (account_id, sequence, kind, amount, balance_after, total_balance_after, transaction_id, created_at)
    SELECT account_id, sequence, 'debited', amount, balance_after, total_balance_after, transaction_id, $4
      FROM batch ORDER BY position
), keys AS (
    INSERT INTO idempotency_keys (account_id, idempotency_key, operation, request_hash, response)
    SELECT account_id, idempotency_key, 'post', request_hash, response::JSONB FROM batch
        ON CONFLICT DO NOTHING
 RETURNING 1
), audit AS (
    INSERT INTO audit_log (actor, role, actor_type, action, account_id, details, idempotency_key, trace_id)
    SELECT actor, role, actor_type, 'debit', account_id, details::JSONB, idempotency_key, trace_id
      FROM batch ORDER BY position
)
SELECT (SELECT count(*) FROM moved) AS accounts_moved, (SELECT count(*) FROM keys) AS keys_stored
