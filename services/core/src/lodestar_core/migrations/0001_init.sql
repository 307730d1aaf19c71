-- Core: the module registry and the durable event log.

CREATE TABLE modules (
    name             text PRIMARY KEY,
    version          text NOT NULL,
    endpoint         text NOT NULL,
    event_types      text[] NOT NULL DEFAULT '{}',
    enabled          boolean NOT NULL DEFAULT true,
    health_status    smallint NOT NULL DEFAULT 0,
    latency_ms       double precision NOT NULL DEFAULT 0,
    last_error       text NOT NULL DEFAULT '',
    uptime_seconds   double precision NOT NULL DEFAULT 0,
    registered_at    timestamptz NOT NULL DEFAULT now(),
    -- The lease the module registered with; each heartbeat renews it by this much.
    lease            interval NOT NULL,
    lease_expires_at timestamptz NOT NULL,
    expiry_announced boolean NOT NULL DEFAULT false
);

-- Log positions. Publishing transactions take an advisory lock before drawing from it, so
-- positions become visible in order and a reader never skips one committed later.
CREATE SEQUENCE event_seq AS bigint;

-- The event log, partitioned by the UUIDv7 id: the id's leading 48 bits are its Unix time in
-- milliseconds, so id ranges are time ranges, a retried publish meets its first copy in the
-- same partition, and old days are dropped as whole partitions.
CREATE TABLE events (
    id         uuid NOT NULL,
    seq        bigint NOT NULL,
    type       text NOT NULL,
    source     text NOT NULL,
    stored_at  timestamptz NOT NULL DEFAULT now(),
    envelope   bytea NOT NULL,
    PRIMARY KEY (id)
) PARTITION BY RANGE (id);

CREATE INDEX events_seq ON events (seq);
CREATE TABLE events_default PARTITION OF events DEFAULT;

CREATE TABLE subscriptions (
    name        text PRIMARY KEY,
    module      text NOT NULL DEFAULT '',
    event_types text[] NOT NULL DEFAULT '{}',
    acked_seq   bigint NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- Failed deliveries, counted so that a poison event is dead-lettered after N attempts.
CREATE TABLE delivery_failures (
    subscription text NOT NULL REFERENCES subscriptions (name) ON DELETE CASCADE,
    seq          bigint NOT NULL,
    attempts     integer NOT NULL,
    last_error   text NOT NULL,
    PRIMARY KEY (subscription, seq)
);

CREATE TABLE dead_letters (
    subscription text NOT NULL REFERENCES subscriptions (name) ON DELETE CASCADE,
    seq          bigint NOT NULL,
    attempts     integer NOT NULL,
    last_error   text NOT NULL,
    envelope     bytea NOT NULL,
    dead_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (subscription, seq)
);

-- Dead letters queued for redelivery by ReplayDeadLetters.
CREATE TABLE redeliveries (
    subscription text NOT NULL REFERENCES subscriptions (name) ON DELETE CASCADE,
    seq          bigint NOT NULL,
    envelope     bytea NOT NULL,
    PRIMARY KEY (subscription, seq)
);
