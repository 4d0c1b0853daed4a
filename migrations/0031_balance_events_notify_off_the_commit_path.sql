-- No NOTIFY in the debit transaction (issue 18). A transaction that has
-- issued NOTIFY takes a cluster-wide lock on the notification queue at
-- commit, so the statement trigger of 0003 serialized every debit commit
-- behind it. Replicas now wake each other from outside the writing
-- transactions: after its commits each replica sends at most one coalesced
-- `NOTIFY balance_events` per few milliseconds from a connection of its own,
-- commits wake the same process's feed in memory, and every feed also polls
-- the horizon on a short timer (src/events/feed.rs).
DROP TRIGGER balance_events_notify ON balance_events;
DROP FUNCTION notify_balance_events();
