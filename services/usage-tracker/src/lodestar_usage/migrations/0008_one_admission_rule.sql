-- Admission has one rule, decided in rounds (lodestar_usage.admission, ADR 0013): the
-- single-call functions of 0005 are no longer called by anything.
DROP FUNCTION admit(uuid, text, text, text, text, text, bigint, bigint, interval, uuid[], text[],
    timestamptz[], bigint[], bigint[]);
DROP FUNCTION commit_hold(uuid, bigint, bigint, text);
DROP FUNCTION release_hold(uuid, text);
