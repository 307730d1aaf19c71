-- Several core replicas on one database (ADR 0011). Each replica records that it is alive; a
-- subscription is held by the replica streaming it, with an epoch that grows on every claim so
-- that a replica which lost its hold can no longer move the cursor (a fencing token). Works
-- behind a transaction-pooling PgBouncer: no session advisory locks, no LISTEN.
CREATE TABLE core_replicas (
    id         text PRIMARY KEY,
    started_at timestamptz NOT NULL DEFAULT now(),
    seen_at    timestamptz NOT NULL DEFAULT now()
);

ALTER TABLE subscriptions
    ADD COLUMN holder text,
    ADD COLUMN epoch  bigint NOT NULL DEFAULT 0;
