"""Lodestar learning: response collection, quality filter, datasets and the routing learner."""
