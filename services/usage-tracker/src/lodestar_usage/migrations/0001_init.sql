-- usage-tracker: the ledger, its rollups, prices, budgets, reservations and alert crossings.
-- Money is integer micro-dollars (1 USD = 1,000,000) everywhere; never floating point.

-- One row per RequestCompleted event, partitioned by day of occurrence so that raw rows expire
-- as whole partitions. The primary key includes the partition key; the event's time is part of
-- the event, so a redelivered event always meets its first copy.
CREATE TABLE ledger (
    occurred_at          timestamptz NOT NULL,
    event_id             uuid NOT NULL,
    model                text NOT NULL,
    provider             text NOT NULL,
    project              text NOT NULL,
    session_id           text NOT NULL,
    user_id              text NOT NULL,
    task_id              text NOT NULL,
    attempt              integer NOT NULL,
    status               smallint NOT NULL,
    duration_ms          bigint NOT NULL,
    input_tokens         bigint NOT NULL,
    output_tokens        bigint NOT NULL,
    cached_read_tokens   bigint NOT NULL,
    cache_write_tokens   bigint NOT NULL,
    reasoning_tokens     bigint NOT NULL,
    cost_micros          bigint NOT NULL,
    cost_source          smallint NOT NULL,
    compute_cost_micros  bigint NOT NULL,
    shadow_cost_micros   bigint NOT NULL,
    savings_micros       bigint NOT NULL,
    reservation_id       text NOT NULL DEFAULT '',
    ingested_at          timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (occurred_at, event_id)
) PARTITION BY RANGE (occurred_at);

CREATE TABLE ledger_default PARTITION OF ledger DEFAULT;
CREATE INDEX ledger_session ON ledger (session_id, occurred_at);
CREATE INDEX ledger_project ON ledger (project, occurred_at);

-- Hourly rollups, maintained in the transaction that inserts the ledger rows. Hours are UTC;
-- day/week/month buckets in a timezone are derived from them.
CREATE TABLE rollup_hourly (
    hour                 timestamptz NOT NULL,
    model                text NOT NULL,
    provider             text NOT NULL,
    project              text NOT NULL,
    user_id              text NOT NULL,
    requests             bigint NOT NULL DEFAULT 0,
    errors               bigint NOT NULL DEFAULT 0,
    input_tokens         bigint NOT NULL DEFAULT 0,
    output_tokens        bigint NOT NULL DEFAULT 0,
    cached_read_tokens   bigint NOT NULL DEFAULT 0,
    cache_write_tokens   bigint NOT NULL DEFAULT 0,
    reasoning_tokens     bigint NOT NULL DEFAULT 0,
    cost_micros          bigint NOT NULL DEFAULT 0,
    compute_cost_micros  bigint NOT NULL DEFAULT 0,
    shadow_cost_micros   bigint NOT NULL DEFAULT 0,
    savings_micros       bigint NOT NULL DEFAULT 0,
    duration_ms          bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (hour, model, provider, project, user_id)
);

-- The same per UTC day: answers whole-day spans of long windows quickly.
CREATE TABLE rollup_daily (
    day                  timestamptz NOT NULL,
    model                text NOT NULL,
    provider             text NOT NULL,
    project              text NOT NULL,
    user_id              text NOT NULL,
    requests             bigint NOT NULL DEFAULT 0,
    errors               bigint NOT NULL DEFAULT 0,
    input_tokens         bigint NOT NULL DEFAULT 0,
    output_tokens        bigint NOT NULL DEFAULT 0,
    cached_read_tokens   bigint NOT NULL DEFAULT 0,
    cache_write_tokens   bigint NOT NULL DEFAULT 0,
    reasoning_tokens     bigint NOT NULL DEFAULT 0,
    cost_micros          bigint NOT NULL DEFAULT 0,
    compute_cost_micros  bigint NOT NULL DEFAULT 0,
    shadow_cost_micros   bigint NOT NULL DEFAULT 0,
    savings_micros       bigint NOT NULL DEFAULT 0,
    duration_ms          bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (day, model, provider, project, user_id)
);

-- The same per session: used when a query groups or filters by session.
CREATE TABLE rollup_session_hourly (
    hour                 timestamptz NOT NULL,
    session_id           text NOT NULL,
    model                text NOT NULL,
    provider             text NOT NULL,
    project              text NOT NULL,
    user_id              text NOT NULL,
    requests             bigint NOT NULL DEFAULT 0,
    errors               bigint NOT NULL DEFAULT 0,
    input_tokens         bigint NOT NULL DEFAULT 0,
    output_tokens        bigint NOT NULL DEFAULT 0,
    cached_read_tokens   bigint NOT NULL DEFAULT 0,
    cache_write_tokens   bigint NOT NULL DEFAULT 0,
    reasoning_tokens     bigint NOT NULL DEFAULT 0,
    cost_micros          bigint NOT NULL DEFAULT 0,
    compute_cost_micros  bigint NOT NULL DEFAULT 0,
    shadow_cost_micros   bigint NOT NULL DEFAULT 0,
    savings_micros       bigint NOT NULL DEFAULT 0,
    duration_ms          bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (session_id, hour, model, provider, project, user_id)
);
CREATE INDEX rollup_session_hour ON rollup_session_hourly (hour);

CREATE TABLE sessions (
    session_id           text PRIMARY KEY,
    project              text NOT NULL,
    user_id              text NOT NULL,
    started_at           timestamptz NOT NULL,
    last_activity_at     timestamptz NOT NULL,
    last_model           text NOT NULL,
    requests             bigint NOT NULL DEFAULT 0,
    errors               bigint NOT NULL DEFAULT 0,
    input_tokens         bigint NOT NULL DEFAULT 0,
    output_tokens        bigint NOT NULL DEFAULT 0,
    cached_read_tokens   bigint NOT NULL DEFAULT 0,
    cache_write_tokens   bigint NOT NULL DEFAULT 0,
    reasoning_tokens     bigint NOT NULL DEFAULT 0,
    cost_micros          bigint NOT NULL DEFAULT 0,
    savings_micros       bigint NOT NULL DEFAULT 0,
    model_switches       bigint NOT NULL DEFAULT 0,
    closed               boolean NOT NULL DEFAULT false
);
CREATE INDEX sessions_activity ON sessions (last_activity_at);

-- Effective-dated prices: micro-dollars per million tokens of each kind.
CREATE TABLE prices (
    model_pattern                 text NOT NULL,
    valid_from                    date NOT NULL,
    input_micros_per_mtok         bigint NOT NULL,
    output_micros_per_mtok        bigint NOT NULL,
    cached_read_micros_per_mtok   bigint,
    cache_write_micros_per_mtok   bigint,
    reasoning_micros_per_mtok     bigint,
    updated_at                    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (model_pattern, valid_from)
);

CREATE TABLE budgets (
    id               uuid PRIMARY KEY,
    name             text NOT NULL,
    scope            smallint NOT NULL,
    scope_value      text NOT NULL,
    period           smallint NOT NULL,
    timezone         text NOT NULL,
    rolling_seconds  bigint NOT NULL DEFAULT 0,
    limit_micros     bigint,
    limit_tokens     bigint,
    thresholds_pct   integer[] NOT NULL,
    session_max_duration_seconds bigint NOT NULL DEFAULT 0,
    session_max_tokens           bigint NOT NULL DEFAULT 0,
    session_max_cost_micros      bigint NOT NULL DEFAULT 0,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now()
);

-- Holds against budgets. 'active' counts until its lease expires; 'committed' counts its actual
-- usage until the ledger records the matching event ('settled'); 'released'/'expired' count nothing.
CREATE TABLE reservations (
    id               uuid PRIMARY KEY,
    project          text NOT NULL,
    user_id          text NOT NULL,
    session_id       text NOT NULL,
    model            text NOT NULL,
    state            text NOT NULL CHECK (state IN ('active', 'committed', 'settled', 'released', 'expired')),
    amount_micros    bigint NOT NULL,
    amount_tokens    bigint NOT NULL,
    created_at       timestamptz NOT NULL DEFAULT now(),
    lease_expires_at timestamptz NOT NULL,
    finished_at      timestamptz
);
CREATE INDEX reservations_open ON reservations (state, lease_expires_at)
    WHERE state IN ('active', 'committed');

CREATE TABLE reservation_budgets (
    reservation_id   uuid NOT NULL REFERENCES reservations (id) ON DELETE CASCADE,
    budget_id        uuid NOT NULL,
    -- The project, user or session the hold counts against (empty for global budgets).
    scope_value      text NOT NULL,
    PRIMARY KEY (budget_id, scope_value, reservation_id)
);

-- Alert crossings: the unique key makes each alert happen once per budget, scope value, window
-- and threshold (threshold 0 with kind 2 is the burn-rate alert), also under replay.
CREATE TABLE budget_crossings (
    budget_id        uuid NOT NULL,
    scope_value      text NOT NULL,
    window_start     timestamptz NOT NULL,
    kind             smallint NOT NULL,
    threshold_pct    integer NOT NULL,
    event_id         uuid NOT NULL,
    payload          bytea NOT NULL,
    published        boolean NOT NULL DEFAULT false,
    created_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (budget_id, scope_value, window_start, kind, threshold_pct)
);
CREATE INDEX budget_crossings_unpublished ON budget_crossings (created_at) WHERE NOT published;

-- Archived (expired) ledger partitions.
CREATE TABLE archives (
    day              date PRIMARY KEY,
    path             text NOT NULL,
    rows             bigint NOT NULL,
    sha256           text NOT NULL,
    archived_at      timestamptz NOT NULL DEFAULT now()
);
