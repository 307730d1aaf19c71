-- A reservation belongs to the principal that made it: only that principal (or an admin, who
-- passes a NULL owner) may commit or release it; another one gets 'foreign'. Reservations made
-- before this migration have owner '' and stay open to anyone until they finish.
ALTER TABLE reservations ADD COLUMN owner text NOT NULL DEFAULT '';

DROP FUNCTION admit(uuid, text, text, text, text, bigint, bigint, interval, uuid[], text[],
    timestamptz[], bigint[], bigint[]);
DROP FUNCTION commit_hold(uuid, bigint, bigint);
DROP FUNCTION release_hold(uuid);

-- As in 0002, with the owner recorded.
CREATE FUNCTION admit(
    p_id uuid,
    p_owner text,
    p_project text,
    p_user text,
    p_session text,
    p_model text,
    p_micros bigint,
    p_tokens bigint,
    p_lease interval,
    p_budgets uuid[],
    p_values text[],
    p_windows timestamptz[],
    p_limit_micros bigint[],
    p_limit_tokens bigint[]
) RETURNS TABLE (
    outcome text,
    budget_id uuid,
    spent_micros bigint,
    spent_tokens bigint,
    held_micros bigint,
    held_tokens bigint,
    lease_expires_at timestamptz
) LANGUAGE plpgsql AS $$
DECLARE
    wanted integer;
    locked integer;
    k record;
BEGIN
    SELECT count(*) INTO wanted FROM unnest(p_windows) AS w WHERE w IS NOT NULL;
    SELECT count(*) INTO locked FROM (
        SELECT 1 FROM budget_counters c
        JOIN unnest(p_budgets, p_values, p_windows) AS u(b, v, w)
          ON c.budget_id = u.b AND c.scope_value = u.v AND c.window_start = u.w
        ORDER BY c.budget_id, c.scope_value, c.window_start
        FOR UPDATE OF c
    ) AS l;
    IF locked < wanted THEN
        RETURN QUERY SELECT 'missing'::text, NULL::uuid, 0::bigint, 0::bigint, 0::bigint,
            0::bigint, NULL::timestamptz;
        RETURN;
    END IF;
    FOR k IN
        SELECT u.b, u.lm, u.lt, c.spent_micros AS sm, c.spent_tokens AS st,
               c.held_micros - coalesce(x.m, 0) AS hm, c.held_tokens - coalesce(x.t, 0) AS ht
        FROM unnest(p_budgets, p_values, p_windows, p_limit_micros, p_limit_tokens)
             AS u(b, v, w, lm, lt)
        JOIN budget_counters c
          ON c.budget_id = u.b AND c.scope_value = u.v AND c.window_start = u.w
        LEFT JOIN LATERAL (
            SELECT sum(r.amount_micros) AS m, sum(r.amount_tokens) AS t
            FROM reservations r JOIN reservation_budgets rb ON rb.reservation_id = r.id
            WHERE r.state = 'active' AND r.lease_expires_at <= now()
              AND rb.budget_id = u.b AND rb.scope_value = u.v AND rb.window_start = u.w
        ) AS x ON true
        ORDER BY u.b
    LOOP
        IF k.lm IS NOT NULL AND k.lm - k.sm - k.hm < p_micros THEN
            RETURN QUERY SELECT 'denied_micros'::text, k.b, k.sm, k.st, k.hm::bigint,
                k.ht::bigint, NULL::timestamptz;
            RETURN;
        END IF;
        IF k.lt IS NOT NULL AND k.lt - k.st - k.ht < p_tokens THEN
            RETURN QUERY SELECT 'denied_tokens'::text, k.b, k.sm, k.st, k.hm::bigint,
                k.ht::bigint, NULL::timestamptz;
            RETURN;
        END IF;
    END LOOP;
    INSERT INTO reservations (id, owner, project, user_id, session_id, model, state,
        amount_micros, amount_tokens, created_at, lease_expires_at)
    VALUES (p_id, p_owner, p_project, p_user, p_session, p_model, 'active', p_micros, p_tokens,
        now(), now() + p_lease);
    INSERT INTO reservation_budgets (reservation_id, budget_id, scope_value, window_start)
    SELECT p_id, u.b, u.v, u.w FROM unnest(p_budgets, p_values, p_windows) AS u(b, v, w);
    IF p_micros <> 0 OR p_tokens <> 0 THEN
        UPDATE budget_counters c
        SET held_micros = c.held_micros + p_micros, held_tokens = c.held_tokens + p_tokens
        FROM unnest(p_budgets, p_values, p_windows) AS u(b, v, w)
        WHERE c.budget_id = u.b AND c.scope_value = u.v AND c.window_start = u.w;
    END IF;
    RETURN QUERY SELECT 'granted'::text, NULL::uuid, 0::bigint, 0::bigint, 0::bigint, 0::bigint,
        now() + p_lease;
END;
$$;

CREATE FUNCTION commit_hold(p_id uuid, p_micros bigint, p_tokens bigint, p_owner text)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    r record;
    was_micros bigint := 0;
    was_tokens bigint := 0;
BEGIN
    SELECT state, amount_micros, amount_tokens, owner INTO r FROM reservations WHERE id = p_id
    FOR UPDATE;
    IF NOT FOUND THEN
        RETURN 'missing';
    END IF;
    IF p_owner IS NOT NULL AND r.owner <> '' AND r.owner <> p_owner THEN
        RETURN 'foreign';
    END IF;
    IF r.state NOT IN ('active', 'expired') THEN
        RETURN r.state;
    END IF;
    UPDATE reservations SET state = 'committed', amount_micros = p_micros,
        amount_tokens = p_tokens, finished_at = now()
    WHERE id = p_id;
    -- An active hold is replaced by the actual usage; an expired one no longer counted.
    IF r.state = 'active' THEN
        was_micros := r.amount_micros;
        was_tokens := r.amount_tokens;
    END IF;
    IF p_micros <> was_micros OR p_tokens <> was_tokens THEN
        UPDATE budget_counters c
        SET held_micros = c.held_micros + p_micros - was_micros,
            held_tokens = c.held_tokens + p_tokens - was_tokens
        FROM (SELECT budget_id, scope_value, window_start FROM reservation_budgets
              WHERE reservation_id = p_id AND window_start IS NOT NULL
              ORDER BY budget_id, scope_value, window_start) AS rb
        WHERE c.budget_id = rb.budget_id AND c.scope_value = rb.scope_value
          AND c.window_start = rb.window_start;
    END IF;
    RETURN r.state;
END;
$$;

CREATE FUNCTION release_hold(p_id uuid, p_owner text)
RETURNS text LANGUAGE plpgsql AS $$
DECLARE
    r record;
BEGIN
    SELECT state, amount_micros, amount_tokens, owner INTO r FROM reservations WHERE id = p_id
    FOR UPDATE;
    IF NOT FOUND THEN
        RETURN 'missing';
    END IF;
    IF p_owner IS NOT NULL AND r.owner <> '' AND r.owner <> p_owner THEN
        RETURN 'foreign';
    END IF;
    IF r.state NOT IN ('active', 'expired') THEN
        RETURN r.state;
    END IF;
    UPDATE reservations SET state = 'released', finished_at = now() WHERE id = p_id;
    IF r.state = 'active' AND (r.amount_micros <> 0 OR r.amount_tokens <> 0) THEN
        UPDATE budget_counters c
        SET held_micros = c.held_micros - r.amount_micros,
            held_tokens = c.held_tokens - r.amount_tokens
        FROM (SELECT budget_id, scope_value, window_start FROM reservation_budgets
              WHERE reservation_id = p_id AND window_start IS NOT NULL
              ORDER BY budget_id, scope_value, window_start) AS rb
        WHERE c.budget_id = rb.budget_id AND c.scope_value = rb.scope_value
          AND c.window_start = rb.window_start;
    END IF;
    RETURN r.state;
END;
$$;
