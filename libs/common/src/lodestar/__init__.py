"""Lodestar: the control plane for people who run many LLMs."""
