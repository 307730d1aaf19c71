-- A number every change of the budgets table bumps (in the changing transaction), so that each
-- tracker process may cache the budget definitions and check, in the same transaction that
-- decides admission, that its copy is still current (ADR 0009).
CREATE TABLE budget_generation (
    only_row   boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    generation bigint NOT NULL
);
INSERT INTO budget_generation (only_row, generation) VALUES (true, 0);

CREATE FUNCTION bump_budget_generation() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE budget_generation SET generation = generation + 1;
    RETURN NULL;
END;
$$;

CREATE TRIGGER budgets_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON budgets
    FOR EACH STATEMENT EXECUTE FUNCTION bump_budget_generation();
