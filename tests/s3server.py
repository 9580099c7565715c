"""A local S3 server (moto) for tests that need object storage."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import boto3
from moto.server import ThreadedMotoServer

ACCESS_KEY = "testing"
SECRET_KEY = "testing"
REGION = "us-east-1"


@dataclass
class S3Server:
    """A running moto S3 server: its ``http://127.0.0.1:port`` endpoint and one bucket."""

    endpoint: str
    bucket: str
    server: ThreadedMotoServer | None = field(default=None, repr=False)

    def stop(self) -> None:
        """Stop answering (an outage); the objects stay in this process's moto backend."""
        if self.server is not None:
            self.server.stop()
            self.server = None

    def restart(self) -> None:
        """Answer again on the same endpoint, with the objects stored before :meth:`stop`."""
        if self.server is None:
            self.server = _start(int(self.endpoint.rsplit(":", 1)[1]))

    def env(self) -> dict[str, str]:
        """The environment variables SlateDB (object_store) needs to reach this server."""
        return {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_REGION": REGION,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ALLOW_HTTP": "true",
        }

    def client(self):  # type: ignore[no-untyped-def]
        """A boto3 S3 client for this server."""
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=REGION,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
        )

    def keys(self, prefix: str = "") -> list[str]:
        """Object keys in the bucket under ``prefix`` (first 1000)."""
        listing = self.client().list_objects_v2(Bucket=self.bucket, Prefix=prefix)
        return [obj["Key"] for obj in listing.get("Contents", [])]


@contextmanager
def moto_s3(bucket: str = "taquba-test") -> Iterator[S3Server]:
    """Run a moto S3 server on 127.0.0.1 (a free port) with ``bucket`` created; stop it after."""
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = _start(0)
    host, port = server.get_host_and_port()
    s3 = S3Server(endpoint=f"http://{host}:{port}", bucket=bucket, server=server)
    try:
        s3.client().create_bucket(Bucket=bucket)
        yield s3
    finally:
        s3.stop()


def _start(port: int) -> ThreadedMotoServer:
    """A moto server on 127.0.0.1 at ``port`` (0: a free one), started."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    return server
