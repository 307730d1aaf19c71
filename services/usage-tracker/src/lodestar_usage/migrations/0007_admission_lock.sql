-- One call that starts an admission round (ADR 0009): this transaction's synchronous_commit, the
-- reservations being finished locked in id order, then the counters the round touches (the
-- reserves' and those of the finished reservations' holds) locked in key order (the order every
-- writer uses); then, in statements of their own (so that they see what
-- the locks now protect), the round's time and budget generation, those reservations with the
-- counters their holds are in, and the counters with the holds whose lease ran out subtracted.
-- kind: 'head' (now_, generation_), 'reservation' (one row per counter of its hold, or one with a
-- NULL budget_id), 'counter'.
CREATE FUNCTION admission_lock(
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
) LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    locked integer;
    kb uuid[];
    kv text[];
    kw timestamptz[];
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
    SELECT count(*) INTO locked FROM (
        SELECT 1 FROM budget_counters c
        JOIN unnest(kb, kv, kw) AS k(b, v, w)
          ON c.budget_id = k.b AND c.scope_value = k.v AND c.window_start = k.w
        ORDER BY c.budget_id, c.scope_value, c.window_start
        FOR UPDATE OF c
    ) AS l;
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
    RETURN QUERY SELECT 'counter'::text, NULL::uuid, NULL::text, NULL::bigint, NULL::bigint,
        NULL::text, NULL::boolean, k.b, k.v, k.w, c.spent_micros, c.spent_tokens,
        (c.held_micros - coalesce(x.m, 0))::bigint, (c.held_tokens - coalesce(x.t, 0))::bigint,
        NULL::timestamptz, NULL::bigint
        FROM unnest(kb, kv, kw) AS k(b, v, w)
        JOIN budget_counters c
          ON c.budget_id = k.b AND c.scope_value = k.v AND c.window_start = k.w
        LEFT JOIN LATERAL (
            SELECT sum(r.amount_micros) AS m, sum(r.amount_tokens) AS t
            FROM reservations r JOIN reservation_budgets rb ON rb.reservation_id = r.id
            WHERE r.state = 'active' AND r.lease_expires_at <= now()
              AND rb.budget_id = k.b AND rb.scope_value = k.v AND rb.window_start = k.w
        ) AS x ON true;
END;
$$;
