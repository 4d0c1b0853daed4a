-- A/B of issue 18's first change: puts back the per-transaction NOTIFY that
-- migrations/0031 removed (the statement trigger of 0003), so pgbench can
-- measure the product's one-debit SQL with it; bench.sh drops it afterwards.
CREATE OR REPLACE FUNCTION bench_notify_balance_events() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('balance_events', '');
    RETURN NULL;
END
$$;
DROP TRIGGER IF EXISTS bench_balance_events_notify ON balance_events;
CREATE TRIGGER bench_balance_events_notify
    AFTER INSERT ON balance_events
    FOR EACH STATEMENT EXECUTE FUNCTION bench_notify_balance_events();
