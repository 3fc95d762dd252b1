"""A small Python consumer of spike-gateway's event stream.

    python clients/python/consumer.py subscribe --from-beginning
    python clients/python/consumer.py subscribe --position-file billing.pos
    python clients/python/consumer.py consume --group billing --from-beginning

`subscribe` reads EventStream/Subscribe and keeps reading across gateway restarts: when the
stream ends with UNAVAILABLE it reconnects with `after_sequence` taken from the status
details the gateway sends (a google.rpc.ErrorInfo in domain "spike-gateway", SPEC §4.1),
or else the last sequence it handled. `consume` joins a consumer group
(EventStream/Consume, SPEC §4.3): it opens the group, acks each delivery once handled and
naks it when the handler fails; the gateway keeps the group's position.

Each event is printed as one JSON line on stdout; reconnects are logged on stderr. Run
generate.py first. The classes are the reusable part: pass your own `handle`.
"""

import argparse
import logging
import os
import pathlib
import queue
import sys
import threading
from typing import Callable, Iterator, Optional

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "gen"))

import grpc  # noqa: E402
from google.protobuf import duration_pb2, json_format  # noqa: E402
from google.rpc import error_details_pb2  # noqa: E402
from grpc_status import rpc_status  # noqa: E402

try:
    from spike.gateway.v1 import event_stream_pb2, event_stream_pb2_grpc, events_pb2  # noqa: E402
except ImportError as error:  # pragma: no cover - a setup mistake, said plainly
    raise SystemExit(f"no generated stubs ({error}): run python {HERE / 'generate.py'} first")

log = logging.getLogger("spike_gateway_consumer")

#: `ErrorInfo.domain` of the gateway's status details.
ERROR_DOMAIN = "spike-gateway"

#: Reconnect quickly once a restarted gateway listens again (gRPC's default backoff grows to
#: two minutes), and accept events as large as the gateway takes webhooks.
CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
]

#: Seconds between reconnect attempts: doubling from the first to the last.
BACKOFF_FIRST, BACKOFF_MAX = 0.1, 2.0


def channel(target: str) -> grpc.Channel:
    """A plaintext channel (use grpc.secure_channel for a TLS listener)."""
    return grpc.insecure_channel(target, options=CHANNEL_OPTIONS)


def call_metadata(token: Optional[str]):
    """The `authorization` metadata the gateway asks for when it has GATEWAY_GRPC_TOKENS."""
    return [("authorization", f"Bearer {token}")] if token else []


def error_info(error: grpc.RpcError) -> Optional[error_details_pb2.ErrorInfo]:
    """The gateway's ErrorInfo in a failed call's status details, if it sent one."""
    try:
        status = rpc_status.from_call(error)
    except ValueError:  # details that disagree with the status: ignore them
        return None
    if status is None:
        return None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            if info.domain == ERROR_DOMAIN:
                return info
    return None


class _Backoff:
    """Waits between reconnects, doubling up to BACKOFF_MAX; reset by a success."""

    def __init__(self, stopped: threading.Event):
        self._stopped = stopped
        self._next = BACKOFF_FIRST

    def reset(self):
        self._next = BACKOFF_FIRST

    def wait(self):
        self._stopped.wait(self._next)
        self._next = min(self._next * 2, BACKOFF_MAX)


class Subscriber:
    """Reads EventStream/Subscribe forever, resuming after gateway restarts without a gap.

    `after_sequence` is where to start (None: `from_beginning` or, without it, live from
    now). `handle(event)` is called once per event in sequence order; the subscriber moves
    past an event only when `handle` returned. `resumed` lists every reconnect as
    (after_sequence, source), source being "error_details" or "last_handled".
    """

    def __init__(
        self,
        target: str,
        handle: Callable[[events_pb2.Event], None],
        *,
        after_sequence: Optional[int] = None,
        from_beginning: bool = False,
        event_types=(),
        token: Optional[str] = None,
    ):
        self._channel = channel(target)
        self._stub = event_stream_pb2_grpc.EventStreamStub(self._channel)
        self._handle = handle
        self.after_sequence = after_sequence
        self._from_beginning = from_beginning
        self._event_types = list(event_types)
        self._metadata = call_metadata(token)
        self._stopped = threading.Event()
        self._call = None
        self.resumed: list = []

    def _request(self) -> event_stream_pb2.SubscribeRequest:
        request = event_stream_pb2.SubscribeRequest(event_types=self._event_types)
        if self.after_sequence is not None:
            request.after_sequence = self.after_sequence
        elif self._from_beginning:
            request.from_beginning = True
        return request

    def run(self):
        """Blocks until stop(); raises any error other than UNAVAILABLE (e.g. OUT_OF_RANGE
        when the position is older than the log retains: the ErrorInfo's
        `oldest_sequence` says where the log now starts)."""
        backoff = _Backoff(self._stopped)
        while not self._stopped.is_set():
            self._call = self._stub.Subscribe(self._request(), metadata=self._metadata)
            try:
                for event in self._call:
                    backoff.reset()
                    self._handle(event)
                    self.after_sequence = event.sequence
                backoff.wait()  # ended without an error: reconnect, not in a tight loop
            except grpc.RpcError as error:
                if self._stopped.is_set():
                    return
                if error.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                self._note_resume(error_info(error))
                backoff.wait()

    def _note_resume(self, info: Optional[error_details_pb2.ErrorInfo]):
        # The gateway names the last sequence it had scanned for this stream, which may be
        # past the last one handled when a filter skipped events: resume from there.
        if info is not None and "after_sequence" in info.metadata:
            named = int(info.metadata["after_sequence"])
            if self.after_sequence is None or named > self.after_sequence:
                self.after_sequence = named
            source = "error_details"
        else:
            source = "last_handled"  # connection refused, or no details: our own position
        self.resumed.append((self.after_sequence, source))
        log.warning(
            "stream unavailable (%s); reconnecting after sequence %s (%s)",
            info.reason if info else "no details",
            self.after_sequence,
            source,
        )

    def stop(self):
        self._stopped.set()
        if self._call is not None:
            self._call.cancel()


class GroupConsumer:
    """One member of a consumer group (EventStream/Consume), across gateway restarts.

    Opens `group` (created by its first open, starting from the beginning of the log when
    `from_beginning`), then calls `handle(delivery)` for each delivery and acks it; a
    handler that raises gets the delivery nak'ed, to be delivered again after
    `nak_delay` seconds. On UNAVAILABLE it opens the group again: the gateway kept the
    group's position, and deliveries left unacked come back.
    """

    def __init__(
        self,
        target: str,
        group: str,
        handle: Callable[[event_stream_pb2.Delivery], None],
        *,
        from_beginning: bool = False,
        max_in_flight: int = 0,
        nak_delay: float = 1.0,
        token: Optional[str] = None,
    ):
        self._channel = channel(target)
        self._stub = event_stream_pb2_grpc.EventStreamStub(self._channel)
        self._open = event_stream_pb2.ConsumeOpen(group=group, max_in_flight=max_in_flight)
        if from_beginning:
            self._open.from_beginning = True
        self._handle = handle
        self._nak_delay = duration_pb2.Duration()
        self._nak_delay.FromMilliseconds(int(nak_delay * 1000))
        self._metadata = call_metadata(token)
        self._stopped = threading.Event()
        self._call = None
        self.reopened = 0

    def run(self):
        """Blocks until stop(); raises any error other than UNAVAILABLE."""
        backoff = _Backoff(self._stopped)
        while not self._stopped.is_set():
            # Requests for this stream; the gRPC thread sending them blocks on get().
            # Unbounded, but it holds at most one settle per delivery in flight, and the
            # gateway bounds those by max_in_flight.
            requests: "queue.Queue[Optional[event_stream_pb2.ConsumeRequest]]" = queue.Queue()
            requests.put(event_stream_pb2.ConsumeRequest(open=self._open))
            self._call = self._stub.Consume(_until_none(requests), metadata=self._metadata)
            try:
                for delivery in self._call:
                    backoff.reset()
                    requests.put(self._settle(delivery))
                backoff.wait()  # ended without an error: reconnect, not in a tight loop
            except grpc.RpcError as error:
                if self._stopped.is_set():
                    return
                if error.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                self.reopened += 1
                log.warning("group stream unavailable; opening %r again", self._open.group)
                backoff.wait()
            finally:
                requests.put(None)

    def _settle(self, delivery) -> event_stream_pb2.ConsumeRequest:
        sequences = [delivery.event.sequence]
        try:
            self._handle(delivery)
        except Exception:  # the handler's failure: deliver it again later
            log.exception("handler failed on sequence %d; nak", delivery.event.sequence)
            nak = event_stream_pb2.Nak(sequences=sequences, delay=self._nak_delay)
            return event_stream_pb2.ConsumeRequest(nak=nak)
        return event_stream_pb2.ConsumeRequest(ack=event_stream_pb2.Ack(sequences=sequences))

    def stop(self):
        self._stopped.set()
        if self._call is not None:
            self._call.cancel()


def _until_none(requests: "queue.Queue") -> Iterator:
    while (request := requests.get()) is not None:
        yield request


def _print_event(event: events_pb2.Event):
    print(json_format.MessageToJson(event, indent=None), flush=True)


def _read_position(path: Optional[str]) -> Optional[int]:
    if path and os.path.exists(path):
        return int(pathlib.Path(path).read_text().strip())
    return None


def _write_position(path: str, sequence: int):
    # Replace atomically, so a crash leaves the old position or the new one.
    temporary = f"{path}.tmp"
    pathlib.Path(temporary).write_text(f"{sequence}\n")
    os.replace(temporary, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default=os.environ.get("GATEWAY_GRPC_TARGET", "localhost:50051"))
    parser.add_argument("--token", default=os.environ.get("GATEWAY_GRPC_TOKEN"),
                        help="a bearer token of GATEWAY_GRPC_TOKENS (env GATEWAY_GRPC_TOKEN)")
    commands = parser.add_subparsers(dest="command", required=True)
    subscribe = commands.add_parser("subscribe", help="read the stream, resuming after restarts")
    subscribe.add_argument("--from-beginning", action="store_true")
    subscribe.add_argument("--after-sequence", type=int)
    subscribe.add_argument("--position-file",
                           help="resume from and record the last handled sequence here")
    subscribe.add_argument("--type", action="append", default=[],
                           help="an event type, e.g. nutrition_record_completed (repeatable)")
    consume = commands.add_parser("consume", help="join a consumer group and ack each event")
    consume.add_argument("--group", required=True)
    consume.add_argument("--from-beginning", action="store_true",
                         help="where a new group starts (default: events from now on)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    if args.command == "subscribe":
        def handle(event):
            _print_event(event)
            if args.position_file:
                _write_position(args.position_file, event.sequence)

        after = args.after_sequence
        if after is None:
            after = _read_position(args.position_file)
        types = [events_pb2.EventType.Value(f"EVENT_TYPE_{t.upper()}") for t in args.type]
        runner = Subscriber(args.target, handle, after_sequence=after,
                            from_beginning=args.from_beginning, event_types=types,
                            token=args.token)
    else:
        runner = GroupConsumer(args.target, args.group, lambda d: _print_event(d.event),
                               from_beginning=args.from_beginning, token=args.token)
    try:
        runner.run()
    except KeyboardInterrupt:
        runner.stop()
    except grpc.RpcError as error:
        info = error_info(error)
        print(f"{error.code().name}: {error.details()}"
              + (f" {info.reason} {dict(info.metadata)}" if info else ""), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
