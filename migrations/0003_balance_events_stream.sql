-- The balance event stream: a sound global cursor, live wake-ups between
-- replicas, and persisted cursors for the engines that subscribe.

-- The cursor horizon (src/events/horizon.rs) relies on this: a writer holds a
-- transaction id *before* it takes a cursor. The ledger already does (it
-- locks the account row first); the default makes it true for every writer.
CREATE FUNCTION next_balance_event_cursor() RETURNS BIGINT LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    PERFORM pg_current_xact_id();
    RETURN nextval('balance_events_cursor_seq');
END
$$;
ALTER TABLE balance_events ALTER COLUMN cursor SET DEFAULT next_balance_event_cursor();
-- Cached sequence values would be handed out after the horizon passed them.
ALTER SEQUENCE balance_events_cursor_seq CACHE 1;

-- One account's events in cursor order (per-account streams and catch-up).
CREATE INDEX balance_events_by_account ON balance_events (account_id, cursor);

-- Wakes every replica's event feed when events commit (NOTIFY is delivered
-- at commit, and not at all on rollback). The payload is empty on purpose:
-- readers re-read the table, so a lost or merged notification loses nothing.
CREATE FUNCTION notify_balance_events() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('balance_events', '');
    RETURN NULL;
END
$$;
CREATE TRIGGER balance_events_notify
    AFTER INSERT ON balance_events
    FOR EACH STATEMENT EXECUTE FUNCTION notify_balance_events();

-- Engines (top-up, alerts) consume the stream with a persisted cursor,
-- advanced in the same transaction as their side effects.
CREATE TABLE event_subscribers (
    name       TEXT PRIMARY KEY,
    cursor     BIGINT NOT NULL DEFAULT 0 CHECK (cursor >= 0),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
