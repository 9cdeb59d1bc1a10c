"""SQS for gate tests: moto in server mode on loopback, queues, and a consumer thread."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import boto3
import httpx
import pytest
from moto.server import ThreadedMotoServer

from conveyor.sandbox.ports import free_ports

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}


@dataclass
class Sqs:
    endpoint: str

    def client(self, region: str) -> Any:
        return boto3.client(
            "sqs",
            region_name=region,
            endpoint_url=self.endpoint,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )

    def create(self, name: str, *regions: str) -> dict[str, str]:
        return {r: self.client(r).create_queue(QueueName=name)["QueueUrl"] for r in regions}

    def send(self, region: str, name: str, count: int = 1, *, delay: int = 0) -> None:
        client = self.client(region)
        url = client.get_queue_url(QueueName=name)["QueueUrl"]
        for index in range(count):
            client.send_message(QueueUrl=url, MessageBody=f"job {index}", DelaySeconds=delay)

    def take(self, region: str, name: str, *, visibility: int = 300) -> list[str]:
        """Receive without deleting, as a running job does: its messages are in flight.
        Returns their receipt handles."""
        client = self.client(region)
        url = client.get_queue_url(QueueName=name)["QueueUrl"]
        got = client.receive_message(
            QueueUrl=url, MaxNumberOfMessages=10, VisibilityTimeout=visibility
        )
        return [m["ReceiptHandle"] for m in got.get("Messages", [])]

    def drain_later(
        self, region: str, name: str, *, after: float, running: tuple[str, ...] = ()
    ) -> threading.Thread:
        """A consumer that, after `after` seconds, finishes the running jobs (deletes the
        messages in flight) and then receives and deletes every waiting message."""

        def consume() -> None:
            time.sleep(after)
            client = self.client(region)
            url = client.get_queue_url(QueueName=name)["QueueUrl"]
            for handle in running:
                client.delete_message(QueueUrl=url, ReceiptHandle=handle)
            while True:
                got = client.receive_message(QueueUrl=url, MaxNumberOfMessages=10)
                messages = got.get("Messages", [])
                if not messages:
                    break
                for message in messages:
                    client.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])

        thread = threading.Thread(target=consume, daemon=True)
        thread.start()
        return thread


@pytest.fixture(name="sqs")
def sqs_fixture(monkeypatch: pytest.MonkeyPatch) -> Iterator[Sqs]:
    for key, value in CREDENTIALS.items():
        monkeypatch.setenv(key, value)
    for key in (
        "AWS_PROFILE",
        "AWS_DEFAULT_REGION",
        "CONVEYOR_SQS_ENDPOINT",
        "AWS_ENDPOINT_URL_SQS",
    ):
        monkeypatch.delenv(key, raising=False)
    port = free_ports(["moto"])["moto"]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    # moto keeps its state per process, across servers: every test starts empty.
    httpx.post(f"{endpoint}/moto-api/reset").raise_for_status()
    yield Sqs(endpoint)
    server.stop()
