"""The HTTP server: Open Inference Protocol (v2) endpoints over a :class:`~qdeploy.serve.core.FallbackModel`.

FastAPI + uvicorn: this module imports them, and only ``qdeploy.serve``'s lazy attributes import this module. Endpoints: ``/v2``, ``/v2/health/live``, ``/v2/health/ready``,
``/v2/models/{m}[/versions/{v}]``, ``.../ready``, ``.../infer`` (JSON and the binary tensor extension), and
``/metrics`` (Prometheus text through prometheus_client, on a registry of this app's own). Client mistakes are
answered with a 4xx and ``{"error": "..."}``; the request id is echoed (the body's ``id`` and the
``X-Request-ID`` header); every response's ``parameters.artifact`` names the artifact that answered.
"""
from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Route

from .. import __version__
from ..errors import QDeployError
from .core import FallbackModel
from .errors import BodyTooLarge, ModelNotFound, NothingServes, RequestError, ServeError
from .protocol import decode_body, encode_infer, parse_infer, tensor_metadata

log = logging.getLogger("qdeploy.serve")

VERSION = "1"
DEFAULT_MAX_BODY = 32 * 1024 * 1024
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


class _Metrics:
    """Request counters and the latency histogram (updated per request), plus a collector that reads the
    chain's state at scrape time (active artifact, readiness, demotions by reason, errors, drift guard)."""

    def __init__(self, model: FallbackModel) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry(auto_describe=True)
        self.model = model
        self.requests = Counter("qdeploy_requests", "Inference requests by the artifact that answered and the HTTP "
                                "status", ["model", "artifact", "status"], registry=self.registry)
        self.latency = Histogram("qdeploy_request_duration_seconds", "Inference request latency (body read to "
                                 "response ready)", ["model"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self._latency = self.latency.labels(model.name)
        self._children: dict[tuple[str, str], Any] = {}
        self.registry.register(self)

    def observe(self, artifact: str, status: int, seconds: float) -> None:
        key = (artifact, str(status))
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self.requests.labels(self.model.name, artifact, str(status))
        child.inc()
        self._latency.observe(seconds)

    def collect(self) -> Any:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        m, name = self.model, self.model.name
        active = m.active
        g = GaugeMetricFamily("qdeploy_active_artifact", "1 for the artifact answering now, 0 for the others",
                              labels=["model", "artifact", "precision"])
        state = GaugeMetricFamily("qdeploy_artifact_ready", "1 when the artifact is loaded, warmed up and in "
                                  "the chain", labels=["model", "artifact"])
        errors = CounterMetricFamily("qdeploy_artifact_errors", "Runtime errors per artifact",
                                     labels=["model", "artifact"])
        for s in m.slots:
            g.add_metric([name, s.id, s.precision], 1.0 if s.id == active else 0.0)
            state.add_metric([name, s.id], 1.0 if s.state == "ready" else 0.0)
            errors.add_metric([name, s.id], s.errors)
        yield g
        yield state
        yield errors
        yield _gauge("qdeploy_model_ready", "1 when the model answers", name, 1.0 if active else 0.0)
        d = CounterMetricFamily("qdeploy_demotions", "Artifacts taken out of the chain, by reason code",
                                labels=["model", "artifact", "reason"])
        total = 0
        for (art, code), n in sorted(m.event_counts.items()):
            d.add_metric([name, art, code], n)
            total += n
        yield d
        yield _counter("qdeploy_demotions_all", "All demotions of this model", name, total)
        guard = m.drift_status()
        for key, help_ in (("shadowed", "Live samples shadow-run through the FP32 reference"),
                           ("dropped", "Shadow samples dropped because the drift queue was full"),
                           ("checks", "Drift decisions taken (one per full window)")):
            yield _counter(f"qdeploy_drift_{key}", help_, name, guard[key] if guard else 0)

    def describe(self) -> list:
        return []


def _gauge(metric: str, help_: str, model: str, value: float) -> Any:
    from prometheus_client.core import GaugeMetricFamily

    g = GaugeMetricFamily(metric, help_, labels=["model"])
    g.add_metric([model], value)
    return g


def _counter(metric: str, help_: str, model: str, value: float) -> Any:
    from prometheus_client.core import CounterMetricFamily

    c = CounterMetricFamily(metric, help_, labels=["model"])
    c.add_metric([model], value)
    return c


def create_app(model: FallbackModel, max_body: int = DEFAULT_MAX_BODY, *,
               metadata_extra: Callable[[], Awaitable[dict[str, Any]]] | None = None,
               metrics_body: Callable[[], Awaitable[bytes]] | None = None, echo_request_id: bool = True) -> Any:
    """The FastAPI application serving ``model`` (start the model yourself, or let :func:`serve` do it).

    ``metadata_extra``: awaited on each model metadata request, its keys added to the answer; ``metrics_body``:
    awaited on each ``/metrics`` request instead of this app's own registry (``app.state.metrics.registry``).
    Ray Serve replicas (:mod:`.ray_serve`) use both to report every replica, not just the one answering, and
    turn ``echo_request_id`` off: Serve itself echoes (or makes up) every response's ``X-Request-ID``.
    """
    if max_body < 1:
        raise QDeployError(f"max_body {max_body} must be at least 1 byte")
    metrics = _Metrics(model)
    app = FastAPI(title="qdeploy", version=__version__, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.model, app.state.metrics = model, metrics

    def error(exc: ServeError, request: Request | None = None) -> Response:
        headers = _rid_header(request) if echo_request_id else {}
        return JSONResponse({"error": str(exc)}, status_code=exc.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        text = {404: f"no route {request.url.path}; see /v2 and /v2/models/{model.name}",
                405: f"method {request.method} is not allowed on {request.url.path}"}.get(exc.status_code,
                                                                                         str(exc.detail))
        return JSONResponse({"error": text}, status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        return JSONResponse({"error": f"bad request to {request.url.path}: {exc.errors()}"}, status_code=400)

    @app.exception_handler(ServeError)
    async def serve_error(request: Request, exc: ServeError) -> Response:
        return error(exc, request)

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> Response:
        log.exception("internal error on %s", request.url.path)
        return JSONResponse({"error": f"internal error: {type(exc).__name__}: {exc}"}, status_code=500)

    def check_model(name: str, version: str | None) -> None:
        if name != model.name:
            raise ModelNotFound(f"model {name!r} is not served here; this server serves {model.name!r}")
        if version is not None and version != VERSION:
            raise ModelNotFound(f"model {name!r} has no version {version!r}; versions: [{VERSION!r}]")

    @app.get("/v2")
    async def server_metadata() -> dict:
        return {"name": "qdeploy", "version": __version__, "extensions": ["binary_tensor_data"]}

    @app.get("/v2/health/live")
    async def live() -> dict:
        return {"live": True}

    @app.get("/v2/health/ready")
    @app.get("/healthz")
    async def ready() -> Response:
        if model.ready:
            return JSONResponse({"ready": True})
        return JSONResponse({"ready": False, "error": model.not_ready_reason()}, status_code=400)

    @app.get("/v2/models/{name}")
    @app.get("/v2/models/{name}/versions/{version}")
    async def model_metadata(name: str, version: str | None = None) -> dict:
        check_model(name, version)
        st = model.status()
        body = {"name": model.name, "versions": [VERSION], "platform": "qdeploy",
                "inputs": tensor_metadata(model.inputs), "outputs": tensor_metadata(model.outputs),
                "active_artifact": st["active_artifact"], "active_budget_passed": st["active_budget_passed"],
                "ready": st["ready"], "policy": st["policy"],
                "failure": st["failure"], "chain": st["chain"], "events": st["events"],
                "drift_guard": st["drift_guard"]}
        if metadata_extra is not None:
            body.update(await metadata_extra())
        return body

    @app.get("/v2/models/{name}/ready")
    @app.get("/v2/models/{name}/versions/{version}/ready")
    async def model_ready(name: str, version: str | None = None) -> Response:
        check_model(name, version)
        if model.ready:
            return JSONResponse({"name": model.name, "ready": True})
        return JSONResponse({"name": model.name, "ready": False, "error": model.not_ready_reason()},
                            status_code=400)

    async def infer(request: Request) -> Response:
        start = time.perf_counter()
        artifact = ""
        try:
            check_model(request.path_params["name"], request.path_params.get("version"))
            body = await _read_body(request, max_body)
            body = decode_body(body, request.headers.get("content-encoding"), max_body)
            req = parse_infer(body, request.headers.get("inference-header-content-length"), model.inputs,
                              model.output_names)
            pred = await run_in_threadpool(model.infer, req.feed)
            artifact = pred.artifact
            payload, head_len = encode_infer(model.name, VERSION, req, pred, {"artifact": artifact})
        except ServeError as exc:
            metrics.observe(artifact, exc.status, time.perf_counter() - start)
            return error(exc, request)
        headers = _rid_header(request) if echo_request_id else {}
        if head_len is None:
            resp = Response(payload, media_type="application/json", headers=headers)
        else:
            headers["Inference-Header-Content-Length"] = str(head_len)
            resp = Response(payload, media_type="application/octet-stream", headers=headers)
        metrics.observe(artifact, 200, time.perf_counter() - start)
        return resp

    # the hot path is a plain Starlette route, matched first: FastAPI's dependency solving and the walk over
    # the other routes cost about as much CPU as the whole minimal app spends on a small request
    app.router.routes[0:0] = [Route("/v2/models/{name}/infer", infer, methods=["POST"]),
                              Route("/v2/models/{name}/versions/{version}/infer", infer, methods=["POST"])]

    @app.get("/metrics")
    async def prometheus() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        text = generate_latest(metrics.registry) if metrics_body is None else await metrics_body()
        return Response(text, media_type=CONTENT_TYPE_LATEST)

    return app


def _rid_header(request: Any) -> dict[str, str]:
    rid = request.headers.get("x-request-id") if request is not None else None
    return {"X-Request-ID": rid} if rid else {}


async def _read_body(request: Any, limit: int) -> bytes:
    length = request.headers.get("content-length")
    if length is not None:
        try:
            n = int(length)
        except ValueError:
            raise RequestError(f"Content-Length {length!r} is not an integer") from None
        if n > limit:
            raise BodyTooLarge(f"the request body has {n} bytes; this server accepts at most {limit} "
                               f"(--max-body-mb)")
        return await request.body()
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"the request body is larger than {limit} bytes (--max-body-mb)")
        chunks.append(chunk)
    return b"".join(chunks)


def bind(host: str, port: int) -> socket.socket:
    """A bound socket for ``host:port`` (port 0: any free port), or one clear error."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise QDeployError(f"--host {host!r} cannot be resolved ({exc.strerror})") from None
    family, _, proto, _, addr = infos[0]
    # proto must say TCP: asyncio sets TCP_NODELAY only on such sockets, and without it a keep-alive client
    # waits ~40 ms per response (Nagle + delayed ACK between the header and body writes)
    sock = socket.socket(family, socket.SOCK_STREAM, proto or socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as exc:
        sock.close()
        raise QDeployError(f"cannot listen on {host}:{port} ({exc.strerror}); choose another --port or --host") \
            from None
    return sock


@dataclass
class ServerHandle:
    """A server running in a thread of this process; :meth:`stop` it (also a context manager)."""

    server: Any
    thread: threading.Thread
    host: str
    port: int

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)

    def __enter__(self) -> ServerHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _uvicorn_server(model: FallbackModel, max_body: int, log_level: str) -> Any:
    import uvicorn

    config = uvicorn.Config(create_app(model, max_body), log_level=log_level, access_log=False, lifespan="off",
                            timeout_graceful_shutdown=5, server_header=False)
    return uvicorn.Server(config)


def start_server(model: FallbackModel, host: str = "127.0.0.1", port: int = 0, max_body: int = DEFAULT_MAX_BODY,
                 log_level: str = "warning", timeout: float = 30.0) -> ServerHandle:
    """Serve ``model`` from a background thread (loopback and a free port by default); returns once listening."""
    sock = bind(host, port)
    server = _uvicorn_server(model, max_body, log_level)
    if model._loader is None:
        model.start(wait=False)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="qdeploy-http", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise QDeployError(f"the server on {host}:{sock.getsockname()[1]} did not start")
        time.sleep(0.01)
    return ServerHandle(server, thread, host, sock.getsockname()[1])


def serve(model: FallbackModel, host: str = "127.0.0.1", port: int = 8000, max_body: int = DEFAULT_MAX_BODY,
          log_level: str = "warning") -> None:
    """Serve ``model`` in the foreground until interrupted. Listening starts at once (``/v2/health/live``);
    readiness follows the first successful warm-up. Raises :class:`NothingServes` if no artifact warms up."""
    sock = bind(host, port)
    server = _uvicorn_server(model, max_body, log_level)
    model.start(wait=False)
    outcome: dict[str, bool] = {}

    def watch() -> None:
        model.wait_loaded()
        if not model.ready:
            outcome["failed"] = True
            server.should_exit = True
            return
        actual = sock.getsockname()
        log.warning("%s ready on http://%s:%s (active artifact %s; chain %s)", model.name, host, actual[1],
                    model.active, " -> ".join(s.id for s in model.slots if s.state == "ready"))

    threading.Thread(target=watch, name="qdeploy-watch", daemon=True).start()
    try:
        server.run(sockets=[sock])
    finally:
        model.close()
    if outcome.get("failed"):
        raise NothingServes(model.failure or f"model {model.name} never became ready")
