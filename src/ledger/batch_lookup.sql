-- Under the account's row lock: the batch's idempotency keys already used on
-- the account, and one entry id per debit of the batch (unused ids leave gaps,
-- as rolled-back inserts do). $1 account_id, $2 keys, $3 batch length.
SELECT idempotency_key, operation, request_hash, response::text AS response, NULL::BIGINT AS entry_id
  FROM idempotency_keys
 WHERE account_id = $1 AND idempotency_key = ANY($2)
UNION ALL
SELECT NULL, NULL, NULL, NULL, nextval('ledger_entries_entry_id_seq')
  FROM generate_series(1, $3)
