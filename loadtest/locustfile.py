"""Locust entry point: `locust -f loadtest/locustfile.py RankerHttpUser --host http://127.0.0.1:8000`
(or RankerGrpcUser with grpc://127.0.0.1:8001). `make loadtest` runs it headless with reports."""

from rankserve.loadtest.users import RankerGrpcUser, RankerHttpUser  # noqa: F401
