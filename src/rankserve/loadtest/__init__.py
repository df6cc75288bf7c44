"""Locust load tests of the served ranker: workload, users, run orchestration and SLO verdicts."""
