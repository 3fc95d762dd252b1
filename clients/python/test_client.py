"""The Python client against the real gateway binary (run by .ci/run):

    python -m pytest clients/python

Starts target/debug/spike-gateway (or $SPIKE_GATEWAY_BIN) on free loopback ports with a
temporary data directory, posts signed webhooks, and checks that `consumer.Subscriber` and
`consumer.GroupConsumer` get every event, exactly once, across a restart of the gateway
(SIGTERM, then a new process on the same ports and data directory). Run generate.py first.
"""

import hashlib
import hmac
import json
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

import consumer
from spike.gateway.v1 import admin_pb2, admin_pb2_grpc

ROOT = pathlib.Path(__file__).resolve().parent.parent.parent
BINARY = pathlib.Path(os.environ.get("SPIKE_GATEWAY_BIN", ROOT / "target/debug/spike-gateway"))
KEY = "python-client-test-key"
ADMIN_TOKEN = "python-client-admin-token"
#: Every wait in these tests ends by this deadline, in seconds, or fails.
DEADLINE = 30


def eventually(what, condition, within=DEADLINE):
    """Polls `condition` until it is true; fails naming `what` after `within` seconds."""
    end = time.monotonic() + within
    while not condition():
        if time.monotonic() > end:
            pytest.fail(f"not within {within}s: {what}")
        time.sleep(0.05)


class Gateway:
    """The binary as an operator runs it; `http`/`grpc` are the addresses it bound."""

    def __init__(self, data_dir, http="127.0.0.1:0", grpc_addr="127.0.0.1:0"):
        assert BINARY.exists(), f"{BINARY} is missing: cargo build --bin spike-gateway"
        env = {
            "PATH": os.environ.get("PATH", ""),
            "SPIKE_WEBHOOK_SIGNATURE_KEY": KEY,
            "GATEWAY_ADMIN_TOKENS": ADMIN_TOKEN,
            "GATEWAY_DATA_DIR": str(data_dir),
            "GATEWAY_HTTP_ADDR": http,
            "GATEWAY_GRPC_ADDR": grpc_addr,
            "GATEWAY_SHUTDOWN_GRACE": "5s",
            "GATEWAY_LOG_FORMAT": "json",
            "RUST_LOG": "info",
        }
        self.process = subprocess.Popen(
            [str(BINARY)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        self.log = []
        listening = threading.Event()
        self.http = self.grpc = None

        def drain():  # reads stderr to the end, so the gateway never blocks on it
            for line in self.process.stderr:
                self.log.append(line)
                if "spike-gateway listening" in line and not listening.is_set():
                    fields = json.loads(line)["fields"]
                    self.http, self.grpc = fields["http"], fields["grpc"]
                    listening.set()

        threading.Thread(target=drain, daemon=True).start()
        end = time.monotonic() + DEADLINE
        while not listening.wait(0.05):
            if self.process.poll() is not None or time.monotonic() > end:
                self.process.kill()
                pytest.fail("the gateway did not listen:\n" + "".join(self.log))

    def post(self, items):
        """Posts `items` as one signed main-category batch; returns the decoded 200 body."""
        body = json.dumps(items).encode()
        signature = hmac.new(KEY.encode(), body, hashlib.sha256).hexdigest()
        request = urllib.request.Request(
            f"http://{self.http}/webhooks/spike",
            data=body,
            headers={"Content-Type": "application/json", "X-Body-Signature": signature},
        )
        with urllib.request.urlopen(request, timeout=DEADLINE) as response:
            assert response.status == 200
            return json.loads(response.read())

    def terminate(self):
        self.process.send_signal(signal.SIGTERM)
        assert self.process.wait(timeout=DEADLINE) == 0, "".join(self.log)

    def kill(self):
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def record_changes(first, count):
    """`count` distinct record_change items (distinct content: distinct events)."""
    return [
        {
            "application_user_id": f"py-user-{n % 3}",
            "timestamp": f"2026-11-22T10:{n // 60:02d}:{n % 60:02d}.000000000Z",
            "event_type": "record_change",
            "metrics": ["steps"],
            "activity_types": ["walking"],
            "provider_slug": "garmin",
            "earliest_record_start_at": "2026-11-22T09:00:00Z",
            "latest_record_end_at": "2026-11-22T10:00:00Z",
        }
        for n in range(first, first + count)
    ]


@pytest.fixture
def data_dir(tmp_path):
    return tmp_path / "data"


@pytest.fixture
def gateways():
    started = []
    yield started
    for gateway in started:
        gateway.kill()


def start(gateways, data_dir, like=None):
    """A gateway on `data_dir`; with `like`, on the same ports as that earlier one."""
    gateway = Gateway(data_dir) if like is None else Gateway(data_dir, like.http, like.grpc)
    gateways.append(gateway)
    return gateway


def in_thread(runner):
    errors = []

    def run():
        try:
            runner.run()
        except Exception as error:  # surfaced by the test through `errors`
            errors.append(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, errors


def test_subscriber_resumes_from_the_error_details_after_a_restart(gateways, data_dir):
    gateway = start(gateways, data_dir)
    seen = []
    subscriber = consumer.Subscriber(gateway.grpc, seen.append, from_beginning=True)
    thread, errors = in_thread(subscriber)
    try:
        assert gateway.post(record_changes(0, 5))["appended"] == 5
        eventually("the subscriber has the first 5 events", lambda: len(seen) == 5)

        gateway.terminate()
        # The stream ended with UNAVAILABLE naming after_sequence=5 in its ErrorInfo.
        eventually("the subscriber saw the shutdown", lambda: subscriber.resumed)
        assert subscriber.resumed[0] == (5, "error_details")

        gateway = start(gateways, data_dir, like=gateway)
        assert gateway.post(record_changes(5, 4))["appended"] == 4
        # Events arrive in sequence order, so once the last one is there, a duplicate or a
        # gap before it would be in `seen` too.
        eventually("the subscriber has event 9", lambda: seen and seen[-1].sequence >= 9)
        assert [e.sequence for e in seen] == list(range(1, 10))
        assert len({e.event_id for e in seen}) == 9
        assert not errors
    finally:
        subscriber.stop()
        thread.join(DEADLINE)


def test_subscriber_started_live_resumes_from_the_position_the_gateway_names(gateways, data_dir):
    gateway = start(gateways, data_dir)
    gateway.post(record_changes(0, 3))
    seen = []
    # No start: live from now. The shutdown details name the resolved position (3), so
    # after the restart it neither replays the 3 old events nor misses new ones.
    subscriber = consumer.Subscriber(gateway.grpc, seen.append)
    thread, errors = in_thread(subscriber)
    try:
        eventually("the gateway counts the subscriber", lambda: _subscribers(gateway) == 1)
        gateway.terminate()
        eventually("the subscriber saw the shutdown", lambda: subscriber.resumed)
        assert subscriber.resumed[0] == (3, "error_details")
        gateway = start(gateways, data_dir, like=gateway)
        gateway.post(record_changes(3, 2))
        eventually("the subscriber has event 5", lambda: seen and seen[-1].sequence >= 5)
        assert [e.sequence for e in seen] == [4, 5]
        assert not errors
    finally:
        subscriber.stop()
        thread.join(DEADLINE)


def _subscribers(gateway):
    with urllib.request.urlopen(f"http://{gateway.http}/metrics", timeout=DEADLINE) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("spike_gateway_subscribers "):
                return float(line.split()[-1])
    return None


def _group(gateway, name):
    with consumer.channel(gateway.grpc) as channel:
        admin = admin_pb2_grpc.AdminStub(channel)
        answer = admin.ListConsumerGroups(
            admin_pb2.ListConsumerGroupsRequest(),
            metadata=consumer.call_metadata(ADMIN_TOKEN),
            timeout=DEADLINE,
        )
    return next((g for g in answer.groups if g.group == name), None)


def test_group_member_acks_and_the_group_keeps_its_position_across_a_restart(gateways, data_dir):
    gateway = start(gateways, data_dir)
    assert gateway.post(record_changes(0, 6))["appended"] == 6
    deliveries = []
    member = consumer.GroupConsumer(gateway.grpc, "py-billing", deliveries.append,
                                    from_beginning=True)
    thread, errors = in_thread(member)
    try:
        eventually("the member has the 6 events", lambda: len(deliveries) == 6)
        eventually("the gateway has the 6 acks", lambda: (g := _group(gateway, "py-billing"))
                   is not None and g.acked_through == 6 and g.pending == 0)

        gateway.terminate()
        eventually("the member saw the shutdown", lambda: member.reopened >= 1)
        gateway = start(gateways, data_dir, like=gateway)
        assert gateway.post(record_changes(6, 3))["appended"] == 3
        eventually("the member has the 3 new events", lambda: len(deliveries) >= 9)
        eventually("the gateway has all 9 acks",
                   lambda: _group(gateway, "py-billing").acked_through == 9)
        # Acked events never came back: each sequence once, each on its first attempt.
        assert sorted(d.event.sequence for d in deliveries) == list(range(1, 10))
        assert {d.attempt for d in deliveries} == {1}
        group = _group(gateway, "py-billing")
        assert (group.pending, group.redeliveries, group.members) == (0, 0, 1)
        assert not errors
    finally:
        member.stop()
        thread.join(DEADLINE)


def test_the_cli_prints_the_stream_as_json_lines(gateways, data_dir, tmp_path):
    gateway = start(gateways, data_dir)
    gateway.post(record_changes(0, 2))
    position = tmp_path / "position"
    cli = subprocess.Popen(
        [sys.executable, str(pathlib.Path(consumer.__file__)), "--target", gateway.grpc,
         "subscribe", "--from-beginning", "--position-file", str(position)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    lines = []
    threading.Thread(target=lambda: lines.extend(json.loads(l) for l in cli.stdout),
                     daemon=True).start()
    try:
        eventually("the CLI printed 2 events", lambda: len(lines) >= 2)
        assert [line["sequence"] for line in lines] == ["1", "2"]
        assert lines[0]["type"] == "EVENT_TYPE_RECORD_CHANGE"
        assert lines[0]["recordChange"]["providerSlug"] == "garmin"
        eventually("the position file says 2",
                   lambda: position.exists() and position.read_text().strip() == "2")
    finally:
        cli.kill()
        cli.wait()
