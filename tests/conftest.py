"""Shared pytest fixtures."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest

from s3server import S3Server, moto_s3

_s3_prefixes = itertools.count()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """One moto S3 server for the whole session."""
    with moto_s3() as server:
        yield server


@pytest.fixture
def s3_url(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> str:
    """``s3://bucket/prefix`` of a fresh store on the moto server, with the AWS variables set."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT", "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(name, raising=False)
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    return f"s3://{s3_server.bucket}/store-{next(_s3_prefixes)}"


# -- Queue fixtures parametrised over every store kind (see queue_helpers.py) --
from queue_helpers import clock, make_queue, queue, store_factory  # noqa: E402,F401
