-- Finished reservations are deleted admission.keep_finished_seconds after they finished (their
-- reservation_budgets rows cascade): without it both tables grow with every admission call.
CREATE INDEX reservations_finished ON reservations (finished_at)
    WHERE state IN ('settled', 'released', 'expired');
