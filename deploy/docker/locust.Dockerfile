# Locust master and workers of the distributed load test (docker compose profile `loadtest`).
# The users, the workload and the SDK come from this repository; WANDS queries are mounted.
FROM python:3.11-slim

WORKDIR /opt/rankserve
COPY pyproject.toml setup.py README.md ./
COPY src ./src
COPY model_repository ./model_repository
COPY clients/python ./clients/python
COPY loadtest ./loadtest
RUN pip install --no-cache-dir ".[loadtest]" ./clients/python

RUN useradd --create-home --uid 10001 rankserve && mkdir /reports && chown rankserve /reports
USER rankserve
# load generators; the master's exit code is the verdict: nothing to probe
HEALTHCHECK NONE
ENV RANKSERVE_WANDS_QUERIES=/data/wands/query.csv
