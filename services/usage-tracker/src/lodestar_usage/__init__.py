"""Lodestar usage-tracker: the ledger, budgets, admission, alerts and reports."""
