"""Cluster topology: which instance is up, which is the writer; pure, fed probe results and time."""
