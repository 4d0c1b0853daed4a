-- A notification's dedupe key belongs to its account and its kind: the same
-- text on another account (or for another kind) is another key. A row of one
-- account can never be returned for, or pre-empt, another account's key.
ALTER TABLE notifications DROP CONSTRAINT notifications_dedupe_key_key;
ALTER TABLE notifications
    ADD CONSTRAINT notifications_dedupe_per_account UNIQUE (account_id, kind, dedupe_key);
