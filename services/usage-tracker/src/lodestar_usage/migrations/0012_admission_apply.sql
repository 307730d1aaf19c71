-- Admission rounds decided before reading (ADR 0017).
--
-- admission_write: what a round writes (new holds, finished reservations, counter deltas), one
-- statement, shared by both kinds of round.
--
-- admission_apply: a whole round in one call and one implicit transaction. The tracker decided
-- its calls on what it last knew of the counters and reservations; this takes the same locks as
-- admission_lock, in the same order, and reads the same rows, and writes the round only if every
-- row is what the tracker decided on (and the budget generation and the time window match).
-- Otherwise it writes nothing and returns the rows as they are (applied = false), for the tracker
-- to decide again. Either way the locks are held from the read to the write, as in a locked round.
--
-- admission_lock (migration 0007, replaced) reads only the counters it locked. It read every
-- counter asked for in a later statement (a fresh snapshot), so a counter created (and
-- committed) by another round between the lock and the read was read unlocked: two rounds could
-- decide on it at once and both grant (seen as a budget granted beyond its limit when its
-- counter was first created). Now such a counter is reported missing, and the round creates it
-- (a no-op) and runs again.
-- The holds whose lease ran out (rare: until the expiry job marks them) are summed by
-- lapsed_holds from the lapsed reservations, not from every hold the counter ever had: that
-- scan grew with the reservations kept (an hour of them) and made each round of a busy budget
-- slower (2,000 holds: 3.5 ms).
--
-- The three functions plan their statements once per connection (force_generic_plan): a plan
-- made for each call's arrays cost more than running it (a round's call took ~1 ms more).
-- The holds whose lease ran out, still in their counters until the expiry job marks them: per
-- counter, summed from the lapsed reservations (the reservations_open index), each joined to its
-- holds by id. OFFSET 0 keeps the planner from turning that into a scan of every hold of a
-- counter (an hour of them are kept), which stale statistics otherwise make it choose. Read by
-- admission_lock and by GetBudget's counter read.
CREATE FUNCTION lapsed_holds() RETURNS TABLE (
    budget_id uuid,
    scope_value text,
    window_start timestamptz,
    micros numeric,
    tokens numeric
) LANGUAGE sql STABLE AS $$
    SELECT h.budget_id, h.scope_value, h.window_start, sum(r.amount_micros), sum(r.amount_tokens)
    FROM reservations r CROSS JOIN LATERAL (
        SELECT rb.budget_id, rb.scope_value, rb.window_start FROM reservation_budgets rb
        WHERE rb.reservation_id = r.id AND rb.window_start IS NOT NULL
        OFFSET 0
    ) AS h
    WHERE r.state = 'active' AND r.lease_expires_at <= now()
    GROUP BY 1, 2, 3
$$;

CREATE OR REPLACE FUNCTION admission_lock(
    p_sync text,
    p_reservations uuid[],
    p_budgets uuid[],
    p_values text[],
    p_windows timestamptz[]
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
    generation_ bigint
) LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan AS $$
#variable_conflict use_column
DECLARE
    locked integer;
    kb uuid[];
    kv text[];
    kw timestamptz[];
    lb uuid[];
    lv text[];
    lw timestamptz[];
    lm numeric[];
    lt numeric[];
BEGIN
    PERFORM set_config('synchronous_commit', p_sync, true);
    SELECT count(*) INTO locked FROM (
        SELECT 1 FROM reservations r WHERE r.id = ANY(p_reservations) ORDER BY r.id FOR UPDATE
    ) AS l;
    SELECT array_agg(u.b), array_agg(u.v), array_agg(u.w) INTO kb, kv, kw FROM (
        SELECT * FROM unnest(p_budgets, p_values, p_windows)
        UNION
        SELECT rb.budget_id, rb.scope_value, rb.window_start FROM reservation_budgets rb
        WHERE rb.reservation_id = ANY(p_reservations) AND rb.window_start IS NOT NULL
    ) AS u(b, v, w);
    SELECT array_agg(l.b), array_agg(l.v), array_agg(l.w) INTO kb, kv, kw FROM (
        SELECT c.budget_id, c.scope_value, c.window_start FROM budget_counters c
        JOIN unnest(kb, kv, kw) AS k(b, v, w)
          ON c.budget_id = k.b AND c.scope_value = k.v AND c.window_start = k.w
        ORDER BY c.budget_id, c.scope_value, c.window_start
        FOR UPDATE OF c
    ) AS l(b, v, w);
    RETURN QUERY SELECT 'head'::text, NULL::uuid, NULL::text, NULL::bigint, NULL::bigint,
        NULL::text, NULL::boolean, NULL::uuid, NULL::text, NULL::timestamptz, NULL::bigint,
        NULL::bigint, NULL::bigint, NULL::bigint, now(), g.generation
        FROM budget_generation g;
    RETURN QUERY SELECT 'reservation'::text, r.id, r.state, r.amount_micros, r.amount_tokens,
        r.owner, r.state = 'active' AND r.lease_expires_at <= now(), rb.budget_id,
        rb.scope_value, rb.window_start, NULL::bigint, NULL::bigint, NULL::bigint,
        NULL::bigint, NULL::timestamptz, NULL::bigint
        FROM reservations r
        LEFT JOIN reservation_budgets rb
          ON rb.reservation_id = r.id AND rb.window_start IS NOT NULL
        WHERE r.id = ANY(p_reservations);
    IF EXISTS (SELECT 1 FROM reservations r
               WHERE r.state = 'active' AND r.lease_expires_at <= now()) THEN
        SELECT array_agg(x.b), array_agg(x.v), array_agg(x.w), array_agg(x.m), array_agg(x.t)
          INTO lb, lv, lw, lm, lt FROM lapsed_holds() AS x(b, v, w, m, t);
    END IF;
    RETURN QUERY SELECT 'counter'::text, NULL::uuid, NULL::text, NULL::bigint, NULL::bigint,
        NULL::text, NULL::boolean, k.b, k.v, k.w, c.spent_micros, c.spent_tokens,
        (c.held_micros - coalesce(x.m, 0))::bigint, (c.held_tokens - coalesce(x.t, 0))::bigint,
        NULL::timestamptz, NULL::bigint
        FROM unnest(kb, kv, kw) AS k(b, v, w)
        JOIN budget_counters c
          ON c.budget_id = k.b AND c.scope_value = k.v AND c.window_start = k.w
        LEFT JOIN unnest(lb, lv, lw, lm, lt) AS x(b, v, w, m, t)
          ON x.b = k.b AND x.v = k.v AND x.w = k.w;
END;
$$;

CREATE FUNCTION admission_write(
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
) RETURNS void LANGUAGE plpgsql
SET plan_cache_mode = force_generic_plan AS $$
BEGIN
    WITH new AS (
        INSERT INTO reservations (id, owner, project, user_id, session_id, model, state,
                                  amount_micros, amount_tokens, created_at, lease_expires_at)
        SELECT i, o, p, us, s, m, 'active', am, at, now(), now() + l
        FROM unnest(p_new_ids, p_new_owners, p_new_projects, p_new_users, p_new_sessions,
                    p_new_models, p_new_micros, p_new_tokens, p_new_leases)
             AS n(i, o, p, us, s, m, am, at, l)
    ), held AS (
        INSERT INTO reservation_budgets (reservation_id, budget_id, scope_value, window_start)
        SELECT * FROM unnest(p_hold_ids, p_hold_budgets, p_hold_values, p_hold_windows)
    ), done AS (
        UPDATE reservations r
        SET state = f.s, amount_micros = f.am, amount_tokens = f.at, finished_at = now()
        FROM unnest(p_done_ids, p_done_states, p_done_micros, p_done_tokens) AS f(i, s, am, at)
        WHERE r.id = f.i
    )
    UPDATE budget_counters c
    SET spent_micros = c.spent_micros + d.sm, spent_tokens = c.spent_tokens + d.st,
        held_micros = c.held_micros + d.hm, held_tokens = c.held_tokens + d.ht
    FROM unnest(p_delta_budgets, p_delta_values, p_delta_windows, p_delta_spent_micros,
                p_delta_spent_tokens, p_delta_held_micros, p_delta_held_tokens)
         AS d(b, v, w, sm, st, hm, ht)
    WHERE c.budget_id = d.b AND c.scope_value = d.v AND c.window_start = d.w;
END;
$$;

CREATE FUNCTION admission_apply(
    p_sync text,
    p_generation bigint,
    p_valid_from timestamptz,
    p_valid_until timestamptz,
    -- the reservations being finished, as the tracker decided on them
    p_reservations uuid[],
    p_states text[],
    p_amount_micros bigint[],
    p_amount_tokens bigint[],
    p_owners text[],
    p_lapsed boolean[],
    -- every counter the round touches (the finished reservations' included), as decided on
    p_budgets uuid[],
    p_values text[],
    p_windows timestamptz[],
    p_spent_micros bigint[],
    p_spent_tokens bigint[],
    p_held_micros bigint[],
    p_held_tokens bigint[],
    -- the write, as admission_write takes it
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
SET plan_cache_mode = force_generic_plan AS $$
#variable_conflict use_column
DECLARE
    as_decided boolean;
BEGIN
    WITH a AS MATERIALIZED (
        SELECT * FROM admission_lock(p_sync, p_reservations, p_budgets, p_values, p_windows)
    ), er AS (
        SELECT * FROM unnest(p_reservations, p_states, p_amount_micros, p_amount_tokens,
                             p_owners, p_lapsed) AS e(i, s, m, t, o, l)
    ), ec AS (
        SELECT * FROM unnest(p_budgets, p_values, p_windows, p_spent_micros, p_spent_tokens,
                             p_held_micros, p_held_tokens) AS e(b, v, w, sm, st, hm, ht)
    )
    SELECT
        (SELECT count(*) FROM a
         WHERE a.kind = 'head' AND a.generation_ = p_generation
           AND a.now_ >= p_valid_from AND a.now_ < p_valid_until) = 1
        AND (SELECT count(DISTINCT a.id) FROM a JOIN er
             ON a.kind = 'reservation' AND a.id = er.i AND a.state = er.s
                AND a.amount_micros = er.m AND a.amount_tokens = er.t
                AND a.owner IS NOT DISTINCT FROM er.o AND a.lapsed = er.l)
            = cardinality(p_reservations)
        AND (SELECT count(*) FROM a WHERE a.kind = 'counter') = cardinality(p_budgets)
        AND (SELECT count(*) FROM a JOIN ec
             ON a.kind = 'counter' AND a.budget_id = ec.b AND a.scope_value = ec.v
                AND a.window_start = ec.w AND a.spent_micros = ec.sm
                AND a.spent_tokens = ec.st AND a.held_micros = ec.hm
                AND a.held_tokens = ec.ht)
            = cardinality(p_budgets)
    INTO as_decided;
    IF NOT as_decided THEN
        RETURN QUERY SELECT l.*, false FROM admission_lock(
            p_sync, p_reservations, p_budgets, p_values, p_windows) AS l;
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
