-- The audit log: one row per administrative change (Deregister, SetModuleEnabled,
-- ReplayDeadLetters), written in the change's own transaction. Append-only: statement triggers
-- refuse UPDATE, DELETE and TRUNCATE whoever asks, so removing an entry takes a deliberate
-- DROP TRIGGER by the schema's owner. Entries are never expired.
CREATE TABLE audit_log (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    changed_at  timestamptz NOT NULL DEFAULT now(),
    principal   text NOT NULL,
    role        text NOT NULL,
    action      text NOT NULL,
    target      text NOT NULL,
    before      jsonb,
    after       jsonb,
    trace_id    text NOT NULL DEFAULT ''
);

CREATE INDEX audit_log_changed_at ON audit_log (changed_at);

CREATE FUNCTION audit_log_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege',
              HINT = 'audit entries are never changed or removed';
END
$$;

CREATE TRIGGER audit_log_append_only
    BEFORE UPDATE OR DELETE OR TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION audit_log_refuse_change();
