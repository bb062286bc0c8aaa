"""gRPC server lifecycle shared by every service.

``serve`` registers the service, grpc.health.v1 and reflection, installs the one
interceptor that maps the error hierarchy to status codes, applies message size
limits, and stops gracefully: NOT_SERVING first, then drain, then stop.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.runtime.errors import SluiceError
from services.runtime.metrics import StageMetrics
from services.runtime.settings import GrpcSettings

log = logging.getLogger(__name__)


class ErrorMappingInterceptor(grpc.ServerInterceptor):
    """Maps SluiceError to its status code; anything else to INTERNAL with a generic
    message (the traceback goes to the log, never to the caller)."""

    def __init__(self, metrics: StageMetrics | None = None) -> None:
        self.metrics = metrics

    def intercept_service(self, continuation: Callable[..., Any], details: Any) -> Any:
        handler = continuation(details)
        if handler is None:
            return None
        method = details.method.rsplit("/", 1)[-1]
        if handler.unary_unary:
            return handler._replace(unary_unary=self._wrap_unary(handler.unary_unary, method))
        if handler.stream_stream:
            return handler._replace(stream_stream=self._wrap_stream(handler.stream_stream, method))
        if handler.unary_stream:
            return handler._replace(unary_stream=self._wrap_stream(handler.unary_stream, method))
        if handler.stream_unary:
            return handler._replace(stream_unary=self._wrap_unary(handler.stream_unary, method))
        return handler

    def _record(self, method: str, code: grpc.StatusCode) -> None:
        if self.metrics is not None:
            self.metrics.requests.labels(self.metrics.stage, method, code.name).inc()

    def _fail(self, context: grpc.ServicerContext, method: str, exc: Exception) -> None:
        if isinstance(exc, SluiceError):
            self._record(method, exc.code)
            context.abort(exc.code, exc.message)
        log.exception("unhandled error in %s", method)
        self._record(method, grpc.StatusCode.INTERNAL)
        context.abort(grpc.StatusCode.INTERNAL, "internal error (see server log)")

    def _wrap_unary(self, fn: Callable[..., Any], method: str) -> Callable[..., Any]:
        def wrapper(request: Any, context: grpc.ServicerContext) -> Any:
            try:
                result = fn(request, context)
            except Exception as exc:
                if _aborted(context):
                    raise
                self._fail(context, method, exc)
            self._record(method, grpc.StatusCode.OK)
            return result

        return wrapper

    def _wrap_stream(self, fn: Callable[..., Any], method: str) -> Callable[..., Any]:
        def wrapper(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            try:
                yield from fn(request, context)
            except Exception as exc:
                if _aborted(context):
                    raise
                self._fail(context, method, exc)
            self._record(method, grpc.StatusCode.OK)

        return wrapper


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
    ) -> None:
        self.server = server
        self.port = port
        self.health = health_servicer
        self.service_names = service_names
        self.grace = grace
        self._stopped = threading.Event()

    def stop(self, grace: float | None = None) -> None:
        """NOT_SERVING (so load balancers stop sending), then drain and stop."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.health.enter_graceful_shutdown()
        self.server.stop(self.grace if grace is None else grace).wait()

    def wait(self) -> None:
        self.server.wait_for_termination()

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: threading.Thread(target=self.stop, daemon=True).start())


def serve(
    settings: GrpcSettings,
    register: Callable[[grpc.Server], list[str]],
    *,
    metrics: StageMetrics | None = None,
) -> RunningServer:
    """Start a server. ``register`` adds servicers and returns their full service
    names (e.g. ``sluice.scoring.v1.ScoringService``) for health and reflection."""
    options = [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.so_reuseport", 0),
    ]
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=settings.max_workers),
        interceptors=[ErrorMappingInterceptor(metrics)],
        options=options,
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
    port = server.add_insecure_port(f"{settings.host}:{settings.port}")
    if port == 0:
        raise OSError(f"cannot bind gRPC to {settings.host}:{settings.port}")
    server.start()
    log.info("gRPC serving %s on %s:%d", names, settings.host, port)
    return RunningServer(server, port, health_servicer, names, settings.grace_seconds)
