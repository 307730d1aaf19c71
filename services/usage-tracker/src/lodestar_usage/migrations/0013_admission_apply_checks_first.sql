-- admission_apply checks a round before reading it (ADR 0017, "Update: checks first").
--
-- A round decided on what the tracker knows almost always still holds. admission_apply (migration
-- 0012) read every row the round touches through admission_lock (one row per reservation hold and
-- counter, the lapsed holds summed, all returned to the caller) and compared them in four
-- sub-queries: about 2 ms of Postgres CPU for a round of one call, most of a round's cost.
--
-- Now it first locks the same rows in the same order and only counts those that are exactly as
-- decided on: the budget generation and the time window, no lapsed hold anywhere (then a counter's
-- stored held is what a round reads), each reservation's state, amounts, owner and lease, each
-- counter's four values. If every count matches, it writes the round and returns one row. Only if
-- something differs, or a lapsed hold exists, does it hand the round to 0012's function, renamed
-- admission_apply_compared: that reads the rows (lapsed holds subtracted), compares, and writes
-- or returns them as before. The locks are the same and taken in the same order (reservations by
-- id, then counters by key), so the round is as safe as the locked one.
--
-- The admission functions plan their statements once per connection (migration 0012). A plan
-- made while the tables were small scanned reservations and budget_counters whole, and was kept
-- for as long as the connection lived: a round of 200 calls took 9 ms in admission_write alone
-- after 30,000 reservations, and more with every reservation kept (an hour of them). Every row
-- these functions touch is found by its key, so they now plan with sequential scans off, and
-- without JIT compilation (the cost a disabled scan adds would otherwise make every call compile
-- its statements: 40 ms).
ALTER FUNCTION admission_apply RENAME TO admission_apply_compared;

CREATE FUNCTION admission_apply(
    p_sync text,
    p_generation bigint,
    p_valid_from timestamptz,
    p_valid_until timestamptz,
    p_reservations uuid[],
    p_states text[],
    p_amount_micros bigint[],
    p_amount_tokens bigint[],
    p_owners text[],
    p_lapsed boolean[],
    p_budgets uuid[],
    p_values text[],
    p_windows timestamptz[],
    p_spent_micros bigint[],
    p_spent_tokens bigint[],
    p_held_micros bigint[],
    p_held_tokens bigint[],
    p_new_ids uuid[],
    p_new_owners text[],
    p_new_projects text[],
    p_new_users text[],
    p_new_sessions text[],
    p_new_models text[],
    p_new_micros bigint[],
    p_new_tokens bigint[],
    p_new_leases interval[],
    p_hold_ids uuid[],
    p_hold_budgets uuid[],
    p_hold_values text[],
    p_hold_windows timestamptz[],
    p_done_ids uuid[],
    p_done_states text[],
    p_done_micros bigint[],
    p_done_tokens bigint[],
    p_delta_budgets uuid[],
    p_delta_values text[],
    p_delta_windows timestamptz[],
    p_delta_spent_micros bigint[],
    p_delta_spent_tokens bigint[],
    p_delta_held_micros bigint[],
    p_delta_held_tokens bigint[]
) RETURNS TABLE (
    kind text,
    id uuid,
    state text,
    amount_micros bigint,
    amount_tokens bigint,
    owner text,
    lapsed boolean,
    budget_id uuid,
    scope_value text,
    window_start timestamptz,
    spent_micros bigint,
    spent_tokens bigint,
    held_micros bigint,
    held_tokens bigint,
    now_ timestamptz,
    generation_ bigint,
    applied boolean
) LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan
SET enable_seqscan = off
SET jit = off AS $$
#variable_conflict use_column
DECLARE
    as_decided boolean := true;
BEGIN
    PERFORM set_config('synchronous_commit', p_sync, true);
    IF cardinality(p_reservations) > 0 THEN
        SELECT count(*) = cardinality(p_reservations) INTO as_decided FROM (
            SELECT r.id, r.state, r.amount_micros, r.amount_tokens, r.owner,
                   r.state = 'active' AND r.lease_expires_at <= now() AS lapsed
            FROM reservations r WHERE r.id = ANY(p_reservations)
            ORDER BY r.id
            FOR UPDATE
        ) AS r
        JOIN unnest(p_reservations, p_states, p_amount_micros, p_amount_tokens, p_owners,
                    p_lapsed) AS e(i, s, m, t, o, l) ON e.i = r.id
        WHERE r.state = e.s AND r.amount_micros = e.m AND r.amount_tokens = e.t
          AND r.owner IS NOT DISTINCT FROM e.o AND r.lapsed = e.l;
    END IF;
    SELECT as_decided AND count(*) = cardinality(p_budgets) INTO as_decided FROM (
        SELECT c.budget_id, c.scope_value, c.window_start, c.spent_micros, c.spent_tokens,
               c.held_micros, c.held_tokens
        FROM budget_counters c
        JOIN unnest(p_budgets, p_values, p_windows) AS k(b, v, w)
          ON c.budget_id = k.b AND c.scope_value = k.v AND c.window_start = k.w
        ORDER BY c.budget_id, c.scope_value, c.window_start
        FOR UPDATE OF c
    ) AS c
    JOIN unnest(p_budgets, p_values, p_windows, p_spent_micros, p_spent_tokens,
                p_held_micros, p_held_tokens) AS e(b, v, w, sm, st, hm, ht)
      ON c.budget_id = e.b AND c.scope_value = e.v AND c.window_start = e.w
    WHERE c.spent_micros = e.sm AND c.spent_tokens = e.st
      AND c.held_micros = e.hm AND c.held_tokens = e.ht;
    as_decided := as_decided
        AND (SELECT g.generation FROM budget_generation g) = p_generation
        AND now() >= p_valid_from AND now() < p_valid_until
        AND NOT EXISTS (SELECT 1 FROM reservations r
                        WHERE r.state = 'active' AND r.lease_expires_at <= now());
    IF NOT as_decided THEN
        RETURN QUERY SELECT * FROM admission_apply_compared(
            p_sync, p_generation, p_valid_from, p_valid_until, p_reservations, p_states,
            p_amount_micros, p_amount_tokens, p_owners, p_lapsed, p_budgets, p_values, p_windows,
            p_spent_micros, p_spent_tokens, p_held_micros, p_held_tokens, p_new_ids, p_new_owners,
            p_new_projects, p_new_users, p_new_sessions, p_new_models, p_new_micros, p_new_tokens,
            p_new_leases, p_hold_ids, p_hold_budgets, p_hold_values, p_hold_windows, p_done_ids,
            p_done_states, p_done_micros, p_done_tokens, p_delta_budgets, p_delta_values,
            p_delta_windows, p_delta_spent_micros, p_delta_spent_tokens, p_delta_held_micros,
            p_delta_held_tokens);
        RETURN;
    END IF;
    PERFORM admission_write(
        p_new_ids, p_new_owners, p_new_projects, p_new_users, p_new_sessions, p_new_models,
        p_new_micros, p_new_tokens, p_new_leases, p_hold_ids, p_hold_budgets, p_hold_values,
        p_hold_windows, p_done_ids, p_done_states, p_done_micros, p_done_tokens,
        p_delta_budgets, p_delta_values, p_delta_windows, p_delta_spent_micros,
        p_delta_spent_tokens, p_delta_held_micros, p_delta_held_tokens);
    RETURN QUERY SELECT 'head'::text, NULL::uuid, NULL::text, NULL::bigint, NULL::bigint,
        NULL::text, NULL::boolean, NULL::uuid, NULL::text, NULL::timestamptz, NULL::bigint,
        NULL::bigint, NULL::bigint, NULL::bigint, now(), p_generation, true;
END;
$$;

ALTER FUNCTION admission_apply_compared SET enable_seqscan = off SET jit = off;
ALTER FUNCTION admission_write SET enable_seqscan = off SET jit = off;
ALTER FUNCTION admission_lock SET enable_seqscan = off SET jit = off;
