-- The gate: while one charge of an account has an unknown outcome, nothing
-- else is charged for the account. An automatic top-up that finds the gate
-- closed names the charge it waits for, and is due again as soon as that
-- charge's outcome is known (the engine's due query), not after a fixed wait
-- that could outlast the reconciliation by up to `reconcile_after`. Read only
-- while the top-up is PENDING (a top-up ended meanwhile keeps what it named).
ALTER TABLE top_ups ADD COLUMN waits_for TEXT REFERENCES top_ups (top_up_id);

-- True while the charge outcome of top-up $1 is unknown: its status says so,
-- or an attempt's gateway call has not answered yet. The one definition of
-- the gate, used by the charge paths and by the engine's due query.
CREATE FUNCTION top_up_outcome_unknown(TEXT) RETURNS BOOLEAN
    LANGUAGE sql STABLE AS $$
    SELECT EXISTS (
        SELECT 1 FROM top_ups t
         WHERE t.top_up_id = $1
           AND (t.status IN ('UNKNOWN', 'NEEDS_ATTENTION')
                OR (t.status = 'PENDING' AND EXISTS (
                        SELECT 1 FROM top_up_attempts a
                         WHERE a.top_up_id = t.top_up_id AND a.outcome = 'UNKNOWN'))))
$$;
