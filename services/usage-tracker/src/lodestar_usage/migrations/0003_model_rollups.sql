-- A second, coarser grain of the hourly and daily rollups: per (hour | day, model, provider)
-- only, without project and user. Summaries that group by model/provider/time and filter on
-- nothing finer read these (tens of rows per day instead of hundreds per hour). Maintained in
-- the same ingest statement as the other rollups; like them, they never expire.
CREATE TABLE rollup_hourly_model (
    hour                 timestamptz NOT NULL,
    model                text NOT NULL,
    provider             text NOT NULL,
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
    PRIMARY KEY (hour, model, provider)
);

CREATE TABLE rollup_daily_model (
    day                  timestamptz NOT NULL,
    model                text NOT NULL,
    provider             text NOT NULL,
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
    PRIMARY KEY (day, model, provider)
);

-- Backfill from the fine rollups (not from the ledger: expired partitions are gone, the rollups
-- are not). Writers of the fine rollups wait until this transaction commits, so nothing ingested
-- meanwhile is missed.
LOCK TABLE rollup_hourly, rollup_daily IN SHARE MODE;

INSERT INTO rollup_hourly_model
SELECT hour, model, provider, sum(requests)::bigint, sum(errors)::bigint,
       sum(input_tokens)::bigint, sum(output_tokens)::bigint, sum(cached_read_tokens)::bigint,
       sum(cache_write_tokens)::bigint, sum(reasoning_tokens)::bigint, sum(cost_micros)::bigint,
       sum(compute_cost_micros)::bigint, sum(shadow_cost_micros)::bigint,
       sum(savings_micros)::bigint, sum(duration_ms)::bigint
FROM rollup_hourly GROUP BY hour, model, provider;

INSERT INTO rollup_daily_model
SELECT day, model, provider, sum(requests)::bigint, sum(errors)::bigint,
       sum(input_tokens)::bigint, sum(output_tokens)::bigint, sum(cached_read_tokens)::bigint,
       sum(cache_write_tokens)::bigint, sum(reasoning_tokens)::bigint, sum(cost_micros)::bigint,
       sum(compute_cost_micros)::bigint, sum(shadow_cost_micros)::bigint,
       sum(savings_micros)::bigint, sum(duration_ms)::bigint
FROM rollup_daily GROUP BY day, model, provider;
