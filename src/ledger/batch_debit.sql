-- A batch of accepted debits on one locked account, in one round trip: the
-- balance and version move once; each debit appends its entry, its balance
-- event (in sequence order, so cursors follow sequences), its idempotency
-- key with the stored response, and its audit row. `keys_stored` below the
-- batch's length means another transaction stored one of its keys first.
-- $1 account_id, $2 final balance, $3 final version, $4 created_at (the
-- transaction's now()), then one array element per debit: $5 entry_id,
-- $6 transaction_id, $7 signed amount, $8 balance_after, $9 total_balance_after,
-- $10 sequence, $11 description, $12 metadata, $13 idempotency key,
-- $14 request hash, $15 stored response, $16 actor, $17 role, $18 audit details,
-- $19 actor type, $20 trace id
WITH moved AS (
    UPDATE accounts
       SET balance = $2, version = $3
     WHERE account_id = $1
 RETURNING version
), batch AS (
    SELECT *
      FROM unnest($5::BIGINT[], $6::UUID[], $7::NUMERIC[], $8::NUMERIC[], $9::NUMERIC[], $10::BIGINT[],
                  $11::TEXT[], $12::TEXT[], $13::TEXT[], $14::TEXT[], $15::TEXT[], $16::TEXT[], $17::TEXT[], $18::TEXT[],
                  $19::TEXT[], $20::TEXT[])
        AS b (entry_id, transaction_id, amount, balance_after, total_balance_after, sequence,
              description, metadata, idempotency_key, request_hash, response, actor, role, details,
              actor_type, trace_id)
), entries AS (
    INSERT INTO ledger_entries (entry_id, transaction_id, account_id, kind, amount, balance_after, description, metadata, idempotency_key, created_at)
    SELECT entry_id, transaction_id, $1, 'usage', amount, balance_after, description, metadata::JSONB, idempotency_key, $4
      FROM batch ORDER BY sequence
), events AS (
    INSERT INTO balance_events (account_id, sequence, kind, amount, balance_after, total_balance_after, transaction_id, created_at)
    SELECT $1, sequence, 'debited', amount, balance_after, total_balance_after, transaction_id, $4
      FROM batch ORDER BY sequence
), keys AS (
    INSERT INTO idempotency_keys (account_id, idempotency_key, operation, request_hash, response)
    SELECT $1, idempotency_key, 'post', request_hash, response::JSONB FROM batch
        ON CONFLICT DO NOTHING
 RETURNING 1
), audit AS (
    INSERT INTO audit_log (actor, role, actor_type, action, account_id, details, idempotency_key, trace_id)
    SELECT actor, role, actor_type, 'debit', $1, details::JSONB, idempotency_key, trace_id
      FROM batch ORDER BY sequence
)
SELECT (SELECT version FROM moved) AS version, (SELECT count(*) FROM keys) AS keys_stored
