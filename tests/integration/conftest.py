"""Fixtures for integration tests: a real S3 API (moto server) shared by the session.

`s3` gives each test a fresh empty bucket on that server, with the test credentials in the environment
(AWS_ACCESS_KEY_ID/SECRET = testing, AWS_DEFAULT_REGION = us-east-1) and no AWS_ENDPOINT_URL, so code
under test only reaches the server through the endpoint it is given.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from tests.s3server import S3Endpoint, moto_fixture, set_test_credentials

moto_server = moto_fixture(scope="session")


@pytest.fixture
def s3(moto_server: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Endpoint]:
    set_test_credentials(monkeypatch)
    ep = S3Endpoint(url=moto_server, bucket=f"t-{uuid.uuid4().hex[:16]}")
    ep.client().create_bucket(Bucket=ep.bucket)
    yield ep
