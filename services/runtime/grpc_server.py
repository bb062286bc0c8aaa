"""gRPC server lifecycle shared by every service.

``serve`` registers the service, grpc.health.v1 and reflection, installs the one
interceptor (admission, authentication, error mapping, request metrics, stream idle
timeouts), applies message size limits and TLS, and stops gracefully: NOT_SERVING first,
then drain, then stop.

Threads. The API's calls run on a pool of ``max_workers`` threads, and a stream holds its
thread until it ends. Health checks run on a small pool of their own, so API calls, busy
or idle, never starve the kubelet's probes. At most ``maximum_concurrent_rpcs`` API calls
may run or wait for a thread; the next is refused at once with RESOURCE_EXHAUSTED (counted,
unlike gRPC's own limit, which sits above it as a backstop that also bounds health checks).
A client stream that sends nothing for ``stream_idle_timeout_seconds`` is ended with
DEADLINE_EXCEEDED.

Security. ``tls.enabled`` serves TLS; ``tls.client_ca_file`` makes it mutual (a client
without a certificate signed by that CA fails the handshake: the client sees UNAVAILABLE).
``auth_token_file`` requires ``authorization: Bearer <token>`` on every call but health's
(probes send no metadata), reflection included (it describes the API to callers who may
use it; grpcurl's ``-H`` sends the header to reflection too); else UNAUTHENTICATED.

Metrics. ``sluice_grpc_requests_total{method,code}`` counts each call once, when it ends,
with the code its client sees: refusals by the interceptor (UNAUTHENTICATED,
RESOURCE_EXHAUSTED), a response too large to send (RESOURCE_EXHAUSTED, checked here before
gRPC would refuse it), a client that cancelled or ran out of its deadline, an idle stream,
an unknown method (UNIMPLEMENTED, method ``unknown``). Not seen, so not counted: calls gRPC
refuses before any handler exists (a request over ``max_message_bytes``, gRPC's backstop
limit, a failed TLS handshake). Samples scored through gRPC carry ``transport="grpc"`` in
the stage's sample counters (services.runtime.metrics.TRANSPORT).
"""

from __future__ import annotations

import hmac
import logging
import queue
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any, NoReturn

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.runtime.errors import ConfigError, SluiceError, TooLarge
from services.runtime.metrics import TRANSPORT, StageMetrics
from services.runtime.settings import GrpcSettings

log = logging.getLogger(__name__)

HEALTH_WORKERS = 2
"""Threads for health checks, apart from the API's."""
BACKSTOP_HEADROOM = 16
"""gRPC's own concurrent-call limit is the API's plus this, so only a flood of health
checks ever meets it."""
UNKNOWN_METHOD = "unknown"
"""The method label of a call to a method this server does not have (bounded label values)."""


class _CountingPool(futures.ThreadPoolExecutor):
    """The API's thread pool, counting calls submitted and not finished: the admission
    check reads it. gRPC submits every call it accepts here, so no call is missed and a
    call that never reaches its handler (a request refused as too large) still ends."""

    def __init__(self, max_workers: int) -> None:
        super().__init__(max_workers=max_workers, thread_name_prefix="grpc-api")
        self._lock = threading.Lock()
        self.in_flight = 0

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> futures.Future[Any]:
        with self._lock:
            self.in_flight += 1
        try:
            future = super().submit(fn, *args, **kwargs)
        except BaseException:
            self._done(None)
            raise
        future.add_done_callback(self._done)
        return future

    def _done(self, _future: object) -> None:
        with self._lock:
            self.in_flight -= 1


class StreamIdle(Exception):
    """A client stream sent no request for the idle timeout."""


class _IdleLimitedRequests:
    """A client stream's requests, ending the call when none comes for ``timeout`` seconds.

    gRPC's request iterator blocks without a timeout, so one daemon thread per stream reads
    it into a one-slot queue (flow control stays with the client: the reader takes the next
    request only once the handler took the last one), and the handler waits on the queue
    with the timeout."""

    _END = object()

    def __init__(self, requests: Iterator[Any], timeout: float) -> None:
        self._timeout = timeout
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=1)
        self._closed = threading.Event()
        threading.Thread(
            target=self._read, args=(requests,), name="grpc-stream-reader", daemon=True
        ).start()

    def _read(self, requests: Iterator[Any]) -> None:
        item: Any
        try:
            for request in requests:
                if not self._put(request):
                    return
            item = self._END
        except BaseException as exc:  # the client cancelled: hand it to the handler
            item = exc
        self._put(item)

    def _put(self, item: Any) -> bool:
        while not self._closed.is_set():
            try:
                self._queue.put(item, timeout=0.2)
                return True
            except queue.Full:
                continue
        return False

    def close(self) -> None:
        self._closed.set()

    def __iter__(self) -> _IdleLimitedRequests:
        return self

    def __next__(self) -> Any:
        deadline = time.monotonic() + self._timeout
        while True:
            # Short waits: a call that ended (the client cancelled, the reader gave up) must
            # free its thread at once, not when the idle timeout comes.
            try:
                item = self._queue.get(timeout=min(0.2, self._timeout))
                break
            except queue.Empty:
                if self._closed.is_set():
                    raise grpc.RpcError("the call ended") from None
                if time.monotonic() >= deadline:
                    raise StreamIdle(f"no request on this stream for {self._timeout:g} s") from None
        if item is self._END:
            self._queue.put(item)  # later next() calls stop too
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item


class _Call:
    """One API call's final code, recorded when gRPC reports the call finished."""

    def __init__(self, context: grpc.ServicerContext) -> None:
        self.context = context
        self.code: grpc.StatusCode | None = None  # None = the handler never finished

    def final(self) -> grpc.StatusCode:
        """The code the client saw. A client that cancelled (or ran out of its deadline)
        saw that, whatever the handler did: a stream's requests can end before gRPC learns
        that the client reset the stream, and the handler then finishes normally."""
        if self.code is None or _client_cancelled(self.context):
            remaining = self.context.time_remaining()
            if remaining is not None and remaining <= 0:
                return grpc.StatusCode.DEADLINE_EXCEEDED
            return grpc.StatusCode.CANCELLED
        return self.code


def _client_cancelled(context: grpc.ServicerContext) -> bool:
    """Whether the call ended by the client's cancellation (or deadline). gRPC Python has no
    public accessor; its call state records it (grpcio is pinned). Read only once the call
    has finished (from an ``add_callback`` callback), when that state is final."""
    state = getattr(context, "_state", None)
    return getattr(state, "client", None) == "cancelled"


class StageInterceptor(grpc.ServerInterceptor):
    """The one interceptor of a stage server.

    For an API call, in order: authentication (when a token is configured), admission
    (``maximum_concurrent_rpcs``), then the handler, with SluiceError mapped to its status
    code and anything else to INTERNAL with a generic message (the traceback goes to the
    log, never to the caller), responses checked against the send limit, and client
    streams bounded by the idle timeout. Refusals run on the health pool, taking no API
    thread. Health calls are only moved to the health pool (and Check counted)."""

    def __init__(
        self,
        settings: GrpcSettings,
        metrics: StageMetrics | None,
        api_pool: _CountingPool,
        health_pool: futures.ThreadPoolExecutor,
        token: bytes | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.api_pool = api_pool
        self.health_pool = health_pool
        self._expected = b"Bearer " + token if token else None

    # -- dispatch ----------------------------------------------------------
    def intercept_service(self, continuation: Callable[..., Any], details: Any) -> Any:
        handler = continuation(details)
        service, _, method = details.method.lstrip("/").rpartition("/")
        if handler is None:
            self._record(UNKNOWN_METHOD, grpc.StatusCode.UNIMPLEMENTED)
            return None
        if service == health.SERVICE_NAME:
            return self._health(handler, method)
        if self._expected is not None and not self._authorized(details.invocation_metadata):
            return self._refuse(
                handler,
                method,
                grpc.StatusCode.UNAUTHENTICATED,
                "missing or wrong bearer token (metadata 'authorization: Bearer <token>')",
            )
        if self.api_pool.in_flight >= self.settings.maximum_concurrent_rpcs:
            return self._refuse(
                handler,
                method,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"server busy: {self.settings.maximum_concurrent_rpcs} calls in progress; "
                "retry with backoff",
            )
        return self._wrap(handler, method)

    def _authorized(self, metadata: Any) -> bool:
        assert self._expected is not None
        got = [v for k, v in metadata or () if k == "authorization"]
        if len(got) != 1:
            return False
        value = got[0].encode() if isinstance(got[0], str) else bytes(got[0])
        return hmac.compare_digest(value, self._expected)

    def _health(self, handler: Any, method: str) -> Any:
        if handler.unary_stream:  # Watch: non-blocking (holds no thread while it waits)
            watch_fn = handler.unary_stream

            def watch(request: Any, context: Any, send_response_callback: Any = None) -> Any:
                return watch_fn(request, context, send_response_callback=send_response_callback)

            watch.experimental_non_blocking = True  # type: ignore[attr-defined]
            watch.experimental_thread_pool = self.health_pool  # type: ignore[attr-defined]
            return handler._replace(unary_stream=watch)
        fn = handler.unary_unary

        def check(request: Any, context: grpc.ServicerContext) -> Any:
            call = _Call(context)
            context.add_callback(lambda: self._record(method, call.final()))
            response = fn(request, context)
            call.code = context.code() or grpc.StatusCode.OK  # NOT_FOUND for unknown names
            return response

        check.experimental_thread_pool = self.health_pool  # type: ignore[attr-defined]
        return handler._replace(unary_unary=check)

    def _refuse(self, handler: Any, method: str, code: grpc.StatusCode, message: str) -> Any:
        def refuse(_request: Any, context: grpc.ServicerContext) -> Any:
            self._record(method, code)
            context.abort(code, message)

        refuse.experimental_thread_pool = self.health_pool  # type: ignore[attr-defined]
        kind = _kind(handler)
        return handler._replace(**{kind: refuse})

    # -- API calls ---------------------------------------------------------
    def _wrap(self, handler: Any, method: str) -> Any:
        kind = _kind(handler)
        fn = getattr(handler, kind)
        wrap = self._wrap_stream if handler.response_streaming else self._wrap_unary
        return handler._replace(**{kind: wrap(fn, method, handler.request_streaming)})

    def _start(
        self, request: Any, context: grpc.ServicerContext, method: str, streaming: bool
    ) -> tuple[_Call, Any]:
        TRANSPORT.set("grpc")  # scoped to this call: gRPC runs each in its own context
        call = _Call(context)
        context.add_callback(lambda: self._record(method, call.final()))
        timeout = self.settings.stream_idle_timeout_seconds
        if streaming and timeout > 0:
            request = _IdleLimitedRequests(request, timeout)
            context.add_callback(request.close)
        return call, request

    def _wrap_unary(self, fn: Callable[..., Any], method: str, streaming: bool) -> Any:
        def wrapper(request: Any, context: grpc.ServicerContext) -> Any:
            call, request = self._start(request, context, method, streaming)
            try:
                result = fn(request, context)
                self._check_size(result)
            except Exception as exc:
                self._fail(context, call, method, exc)
            call.code = grpc.StatusCode.OK
            return result

        return wrapper

    def _wrap_stream(self, fn: Callable[..., Any], method: str, streaming: bool) -> Any:
        def wrapper(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            call, request = self._start(request, context, method, streaming)
            try:
                for response in fn(request, context):
                    self._check_size(response)
                    yield response
            except Exception as exc:
                self._fail(context, call, method, exc)
            call.code = grpc.StatusCode.OK

        return wrapper

    def _check_size(self, response: Any) -> None:
        size = response.ByteSize()
        limit = self.settings.max_message_bytes
        if size > limit:
            raise TooLarge(
                f"response of {size} bytes exceeds the {limit}-byte message limit; "
                "send fewer or smaller samples per request"
            )

    def _fail(
        self, context: grpc.ServicerContext, call: _Call, method: str, exc: Exception
    ) -> NoReturn:
        """Abort with the status ``exc`` maps to (raises)."""
        if _aborted(context):  # the handler called context.abort() itself
            call.code = context.code()
            raise exc
        if isinstance(exc, StreamIdle):
            call.code = grpc.StatusCode.DEADLINE_EXCEEDED
            context.abort(call.code, str(exc))
        if isinstance(exc, grpc.RpcError) and not context.is_active():
            raise exc  # the client cancelled while we read its stream: nothing to send
        if isinstance(exc, SluiceError):
            call.code = exc.code
            context.abort(exc.code, exc.message)
        log.exception("unhandled error in %s", method)
        call.code = grpc.StatusCode.INTERNAL
        context.abort(grpc.StatusCode.INTERNAL, "internal error (see server log)")
        raise AssertionError("context.abort returned")

    def _record(self, method: str, code: grpc.StatusCode) -> None:
        if self.metrics is not None:
            self.metrics.requests.labels(self.metrics.stage, method, code.name).inc()


def _kind(handler: Any) -> str:
    """The RpcMethodHandler field holding the behaviour."""
    if handler.request_streaming:
        return "stream_stream" if handler.response_streaming else "stream_unary"
    return "unary_stream" if handler.response_streaming else "unary_unary"


def _aborted(context: grpc.ServicerContext) -> bool:
    """True once the handler itself called context.abort(): grpc signals that with a
    bare Exception, which must propagate untouched."""
    code = getattr(context, "code", None)
    return callable(code) and code() is not None


class RunningServer:
    """A started server with its health servicer; ``stop`` drains gracefully."""

    def __init__(
        self,
        server: grpc.Server,
        port: int,
        health_servicer: health.HealthServicer,
        service_names: list[str],
        grace: float,
        pools: tuple[futures.ThreadPoolExecutor, ...] = (),
    ) -> None:
        self.server = server
        self.port = port
        self.health = health_servicer
        self.service_names = service_names
        self.grace = grace
        self._pools = pools
        self._stopped = threading.Event()

    @property
    def api_calls_in_flight(self) -> int:
        """API calls running or waiting for a thread (what admission compares)."""
        pool = self._pools[0] if self._pools else None
        return pool.in_flight if isinstance(pool, _CountingPool) else 0

    def stop(self, grace: float | None = None) -> None:
        """NOT_SERVING (so load balancers stop sending), then drain and stop."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.health.enter_graceful_shutdown()
        self.server.stop(self.grace if grace is None else grace).wait()
        for pool in self._pools:
            pool.shutdown(wait=False, cancel_futures=True)

    def wait(self) -> None:
        self.server.wait_for_termination()

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: threading.Thread(target=self.stop, daemon=True).start())


def _read(setting: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"grpc.{setting}: cannot read {path}: {exc.strerror}") from exc


def read_token(settings: GrpcSettings) -> bytes | None:
    """The expected bearer token, or None when authentication is off."""
    if not settings.auth_token_file:
        return None
    token = _read("auth_token_file", settings.auth_token_file).strip()
    if not token:
        raise ConfigError(f"grpc.auth_token_file: {settings.auth_token_file} is empty")
    return token


def server_credentials(settings: GrpcSettings) -> grpc.ServerCredentials | None:
    """TLS credentials (mutual when a client CA is set), or None for cleartext."""
    tls = settings.tls
    if not tls.enabled:
        return None
    pair = (_read("tls.key_file", tls.key_file), _read("tls.cert_file", tls.cert_file))
    client_ca = _read("tls.client_ca_file", tls.client_ca_file) if tls.client_ca_file else None
    return grpc.ssl_server_credentials(
        [pair], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def serve(
    settings: GrpcSettings,
    register: Callable[[grpc.Server], list[str]],
    *,
    metrics: StageMetrics | None = None,
) -> RunningServer:
    """Start a server. ``register`` adds servicers and returns their full service
    names (e.g. ``sluice.scoring.v1.ScoringService``) for health and reflection."""
    token = read_token(settings)
    credentials = server_credentials(settings)
    options = [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.so_reuseport", 0),
    ]
    api_pool = _CountingPool(settings.max_workers)
    health_pool = futures.ThreadPoolExecutor(HEALTH_WORKERS, thread_name_prefix="grpc-health")
    server = grpc.server(
        api_pool,
        interceptors=[StageInterceptor(settings, metrics, api_pool, health_pool, token)],
        options=options,
        maximum_concurrent_rpcs=settings.maximum_concurrent_rpcs + BACKSTOP_HEADROOM,
    )
    names = register(server)
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in names:
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        [*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server
    )
    address = f"{settings.host}:{settings.port}"
    if credentials is None:
        port = server.add_insecure_port(address)
    else:
        port = server.add_secure_port(address, credentials)
    if port == 0:
        raise OSError(f"cannot bind gRPC to {address}")
    server.start()
    log.info(
        "gRPC serving %s on %s:%d (%s%s)",
        names,
        settings.host,
        port,
        "mTLS" if settings.tls.client_ca_file else "TLS" if credentials else "cleartext",
        ", bearer token required" if token else "",
    )
    return RunningServer(
        server, port, health_servicer, names, settings.grace_seconds, (api_pool, health_pool)
    )
