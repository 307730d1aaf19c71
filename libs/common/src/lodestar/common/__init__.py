"""The runtime every Lodestar service shares."""
