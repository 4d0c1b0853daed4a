-- The audit trail read through ListAuditEvents: who acted (a person's or a
-- service's token, or one of billing's own engines), with which request
-- (the client's idempotency key, the W3C trace id), and no card data.
ALTER TABLE audit_log
    ADD COLUMN actor_type      TEXT NOT NULL DEFAULT 'user'
        CHECK (actor_type IN ('user', 'service', 'engine')),
    ADD COLUMN idempotency_key TEXT,
    ADD COLUMN trace_id        TEXT;

-- Rows written before this migration: services and billing's own engines
-- acted under the service role.
UPDATE audit_log SET actor_type = 'engine'
 WHERE actor IN ('auto-top-up-engine', 'stripe-webhook');
UPDATE audit_log SET actor_type = 'service'
 WHERE actor_type = 'user' AND role ~ '(^|,)service(,|$)';

-- Card labels have no place in the trail (the card's id is the target).
UPDATE audit_log SET details = details - 'brand' - 'last4'
 WHERE details ? 'brand' OR details ? 'last4';

-- Filters of one account's trail: by time (newest first) and by actor.
CREATE INDEX audit_log_by_account_time ON audit_log (account_id, created_at DESC, audit_id DESC);

-- The trail is append-only, like the ledger.
CREATE TRIGGER audit_log_is_append_only
    BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION refuse_change();
