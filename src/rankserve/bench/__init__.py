"""``make bench``: the same workload at the same concurrency against three setups, side by side."""
