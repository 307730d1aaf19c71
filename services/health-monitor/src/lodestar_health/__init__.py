"""Lodestar health-monitor: probes of modules and LLM providers, statistics and circuit breakers."""
