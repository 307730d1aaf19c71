-- The lease its prober will hold so that one replica probes at a time
-- (lodestar.common.leases.LEASES_MIGRATION).
CREATE TABLE leases (
    name       text PRIMARY KEY,
    holder     text NOT NULL,
    epoch      bigint NOT NULL,
    expires_at timestamptz NOT NULL
);
