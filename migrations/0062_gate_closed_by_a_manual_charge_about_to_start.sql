-- The gate also counts a manual top-up (Add Funds, Retry) that is recorded
-- and about to charge: PENDING with no attempt yet. Between its recording
-- and its first attempt a second Add Funds found the gate open, was
-- recorded too, and then — finding the first one's charge in flight —
-- ended FAILED with the client's idempotency key spent on it: a replay
-- answered FAILED forever and charged nothing. Now the second one is
-- refused at once (FAILED_PRECONDITION), its key not consumed.
CREATE OR REPLACE FUNCTION top_up_outcome_unknown(TEXT) RETURNS BOOLEAN
    LANGUAGE sql STABLE AS $$
    SELECT EXISTS (
        SELECT 1 FROM top_ups t
         WHERE t.top_up_id = $1
           AND (t.status IN ('UNKNOWN', 'NEEDS_ATTENTION')
                OR (t.status = 'PENDING' AND EXISTS (
                        SELECT 1 FROM top_up_attempts a
                         WHERE a.top_up_id = t.top_up_id AND a.outcome = 'UNKNOWN'))
                OR (t.status = 'PENDING' AND t.trigger <> 'AUTOMATIC' AND NOT EXISTS (
                        SELECT 1 FROM top_up_attempts a WHERE a.top_up_id = t.top_up_id))))
$$;
