-- Ledger rows no price covered when they were recorded (cost_source 4 = COST_SOURCE_UNPRICED):
-- ListUnpriced, Recost and the unpriced gauges find them without reading the priced rows. Only
-- unpriced rows are indexed, so ingest of priced rows pays nothing for it.
CREATE INDEX ledger_unpriced ON ledger (occurred_at) WHERE cost_source = 4;
