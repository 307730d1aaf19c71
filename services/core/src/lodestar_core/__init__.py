"""Lodestar core: the module registry and the durable event bus."""
