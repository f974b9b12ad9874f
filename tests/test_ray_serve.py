"""Ray Serve: ``qdeploy serve BUNDLE --replicas N``, each replica holding its own fallback chain.

The fast tests need no Ray: the CLI's flags and its error without Ray, and the replica logic (status and metrics
of every replica, health, start-up) on two in-process replicas and an in-process hub. The slow ones start one local
Ray at a time, on loopback, and always shut it down: the CLI end to end, then one 2-replica server with a fault
injected into replica 0's first artifact, under bounded load.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
INPUT = "input"
INT8_ID = "onnxruntime-cpu-int8"
REF_ID = "reference-fp32"


def _wait(cond, timeout=15.0, step=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(step)
    return False


def _metric(text: str, name: str, **labels) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
    return None


def _body(x: np.ndarray) -> dict:
    return {"inputs": [{"name": INPUT, "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def break_after(model, good: int, message: str = "injected: the INT8 kernel crashed") -> None:
    """Make ``model``'s first artifact fail every call after its warm-up and ``good`` answers (before start)."""
    first = model.slots[0].id
    original = model.bundle.runner

    def runner(key=0, threads=None):
        r = original(key, threads)
        if key != first:
            return r
        impl, calls = r.infer_impl, [0]

        def flaky(feed):
            calls[0] += 1
            if calls[0] > 1 + good:
                raise RuntimeError(message)
            return impl(feed)

        r.infer_impl = flaky
        return r

    model.bundle.runner = runner


def fault_in_rank_0(model, replica: dict) -> None:
    """The servers' ``setup`` hook: replica 0's first artifact crashes after 10 answers; the others are healthy."""
    if replica["rank"] == 0:
        break_after(model, 10, f"injected: the INT8 kernel crashed in replica {replica['replica']}")


# --------------------------------------------------------------------------------------------- the CLI, no Ray
def test_replicas_without_ray_is_one_clear_error(monkeypatch, tmp_path, capsys):
    from qdeploy import cli

    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    for flags in (["--replicas", "2"], ["--ray-address", "10.0.0.1:6379"]):
        assert cli.main(["serve", str(tmp_path), *flags]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "pip install 'qdeploy[ray]'" in err[0] and "--replicas" in err[0], err


def test_cli_hands_the_chain_options_to_every_replica(monkeypatch, tmp_path, capsys):
    from qdeploy import cli
    from qdeploy.serve import ray_serve

    pytest.importorskip("ray.serve")
    calls = []
    monkeypatch.setattr(ray_serve, "serve_ray", lambda bundle, **kw: calls.append((bundle, kw)))
    assert cli.main(["serve", str(tmp_path), "--replicas", "3", "--port", "9123", "--policy", "strict",
                     "--drift-sample", "0.5", "--breaker-errors", "2", "--name", "digits", "--max-body-mb", "1"]) == 0
    [(bundle, kw)] = calls
    assert bundle == str(tmp_path) and kw["replicas"] == 3 and kw["port"] == 9123 and kw["ray_address"] is None
    assert kw["max_body"] == 1024 * 1024
    assert kw["options"] == {"name": "digits", "policy": "strict", "reference_fallback": True, "breaker_errors": 2,
                             "breaker_window": 20, "drift_sample": 0.5, "drift_window": 64, "threads": None,
                             "allow_nonfinite": False}
    assert cli.main(["serve", str(tmp_path), "--ray-address", "auto"]) == 0
    assert calls[-1][1]["replicas"] == 1 and calls[-1][1]["ray_address"] == "auto"
    assert cli.main(["serve", str(tmp_path), "--replicas", "0"]) == 2
    assert "--replicas 0 must be at least 1" in capsys.readouterr().err


def test_the_ray_serve_module_imports_no_ray_until_a_server_starts():
    code = ("import sys, qdeploy.serve.ray_serve; heavy = [m for m in ('ray', 'fastapi', 'prometheus_client', "
            "'onnxruntime') if m in sys.modules]; print(heavy); assert not heavy")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=60)


# --------------------------------------------------------------------------------------------- replicas, no Ray
def _replicas(bundle, hub, setups=(None, None), **options):
    """Two in-process replicas sharing ``hub`` (as the Ray actor would), each with its own model."""
    from qdeploy.serve import FallbackModel
    from qdeploy.serve.ray_serve import Replica, start_model

    out = []
    for i, setup in enumerate(setups):
        model = FallbackModel(bundle, drift_sample=0, **options)
        if setup:
            setup(model)
        asyncio.run(start_model(model))

        async def get():
            return hub.get()

        out.append(Replica(model, f"r{i}", i, hub.put, get, 1 << 20, {"engine": "test"}, push_interval=0.05))
    return out


def test_every_replica_status_and_metrics_reach_any_replica(digits_bundle):
    from prometheus_client.parser import text_string_to_metric_families

    from qdeploy.bundle import Bundle
    from qdeploy.serve.ray_serve import Hub

    x = Bundle.load(digits_bundle).samples()[f"input:{INPUT}"]
    hub = Hub()
    faulty, healthy = _replicas(digits_bundle, hub, (lambda m: break_after(m, 2), None))
    try:
        for i in range(8):  # the faulty one demotes after 3 errors; every request still gets an answer
            assert faulty.model.infer({INPUT: x[i:i + 1]}).artifact in (INT8_ID, REF_ID)
            assert healthy.model.infer({INPUT: x[i:i + 1]}).artifact == INT8_ID
        assert faulty.model.active == REF_ID
        assert _wait(lambda: hub.get().get("r0", {}).get("status", {}).get("demotions"), timeout=5)
        meta = asyncio.run(healthy.metadata_extra())  # asked of the healthy replica
        assert meta["replica"] == {"id": "r1", "rank": 1, "engine": "test"}
        by_id = {r["replica"]: r for r in meta["replicas"]}
        assert by_id["r0"]["active_artifact"] == REF_ID and by_id["r1"]["active_artifact"] == INT8_ID
        assert by_id["r0"]["demotions"] == [{"artifact": INT8_ID, "reason": "RUNTIME_ERROR", "count": 1}]
        assert "injected" in by_id["r0"]["events"][0]["message"] and by_id["r1"]["demotions"] == []
        assert by_id["r1"]["age_s"] == 0.0
        text = asyncio.run(healthy.metrics_body()).decode()
        names = {f.name for f in text_string_to_metric_families(text)}  # a valid exposition: one family per name
        assert {"qdeploy_demotions", "qdeploy_active_artifact", "qdeploy_replica_up"} <= names
        assert _metric(text, "qdeploy_demotions_total", replica="r0", artifact=INT8_ID, reason="RUNTIME_ERROR") == 1
        assert _metric(text, "qdeploy_demotions_total", replica="r1") is None
        assert _metric(text, "qdeploy_active_artifact", replica="r0", artifact=REF_ID) == 1
        assert _metric(text, "qdeploy_active_artifact", replica="r1", artifact=INT8_ID) == 1
        assert _metric(text, "qdeploy_replica_up", replica="r0") == 1 and _metric(text, "qdeploy_replica_up",
                                                                                   replica="r1") == 1
        hub.drop("r0")  # a replica that stopped (or was replaced) leaves the answers
        assert [r["replica"] for r in asyncio.run(healthy.metadata_extra())["replicas"]] in (["r1"], ["r1", "r0"])
    finally:
        faulty.close()
        healthy.close()


def test_a_hub_that_does_not_answer_leaves_the_replica_serving(digits_bundle):
    from qdeploy.serve import FallbackModel
    from qdeploy.serve.ray_serve import Replica, start_model

    def put(replica, snapshot):
        raise ConnectionError("hub gone")

    async def get():
        raise ConnectionError("hub gone")

    model = FallbackModel(digits_bundle, drift_sample=0)
    asyncio.run(start_model(model))
    replica = Replica(model, "r0", 0, put, get, 1 << 20, push_interval=0.05)
    try:
        meta = asyncio.run(replica.metadata_extra())
        assert [r["replica"] for r in meta["replicas"]] == ["r0"] and "hub" in meta["replicas_error"]
        assert _metric(asyncio.run(replica.metrics_body()).decode(), "qdeploy_model_ready", replica="r0") == 1
    finally:
        replica.close()


def test_strict_replica_with_nothing_left_is_unhealthy(digits_bundle):
    from qdeploy.bundle import Bundle
    from qdeploy.serve import InferenceFailed, NothingServes
    from qdeploy.serve.ray_serve import Hub

    x = Bundle.load(digits_bundle).samples()[f"input:{INPUT}"][:1]
    hub = Hub()
    [replica] = _replicas(digits_bundle, hub, (lambda m: break_after(m, 0),), policy="strict", breaker_errors=2)
    try:
        replica.check_health()  # answering: healthy
        for _ in range(2):
            with pytest.raises(InferenceFailed, match="policy strict"):
                replica.model.infer({INPUT: x})
        with pytest.raises(NothingServes, match="RUNTIME_ERROR"):  # Serve replaces a replica whose check fails
            replica.check_health()
        assert _wait(lambda: hub.get()["r0"]["status"]["failure"] is not None, timeout=5)
        assert hub.get()["r0"]["status"]["demotions"] == []  # strict never demotes
    finally:
        replica.close()


def test_a_replica_starts_only_once_its_model_answers(digits_bundle):
    from qdeploy.serve import FallbackModel, NothingServes
    from qdeploy.serve.ray_serve import start_model

    model = FallbackModel(digits_bundle, drift_sample=0, reference_fallback=False)
    break_after(model, -1)  # the only artifact fails its warm-up
    with pytest.raises(NothingServes, match="injected"):
        asyncio.run(start_model(model))


# --------------------------------------------------------------------------------------------- on Ray (slow)
def _client_load(url: str, model: str, x: np.ndarray, n: int, results: list) -> None:
    import httpx

    with httpx.Client(base_url=url, timeout=30) as c:
        for i in range(n):
            try:
                r = c.post(f"/v2/models/{model}/infer", json=_body(x[i % len(x)][None]))
                results.append((r.status_code, r.json().get("parameters", {}).get("artifact")))
            except Exception as exc:  # a dropped connection is a failed request too
                results.append((-1, repr(exc)))


@pytest.fixture()
def one_ray():
    """No Ray left running in this process by another module (the fan-out's): one Ray on the machine at a time."""
    pytest.importorskip("ray.serve")
    import ray

    if ray.is_initialized():
        ray.shutdown()


@pytest.mark.slow
def test_cli_serve_replicas_end_to_end(digits_bundle, one_ray):
    """`qdeploy serve BUNDLE --replicas 2`: a local Ray, the v2 routes, both replicas, a clean stop on SIGINT.
    Runs before the module's server below (the file's order), so one Ray runs at a time."""
    import httpx

    from qdeploy.bundle import Bundle

    x = Bundle.load(digits_bundle).samples()[f"input:{INPUT}"]
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "qdeploy.cli", "serve", str(digits_bundle), "--replicas", "2",
                             "--port", str(port), "--name", "digits", "--drift-sample", "0.5"], cwd=ROOT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)  # no full pipe
    reader.start()
    try:
        def ready():  # the CLI says so once `serve.run` returned: every replica answers
            return proc.poll() is not None or any("ready on http" in line for line in lines)

        assert _wait(ready, timeout=150, step=0.5) and proc.poll() is None, "".join(lines)[-3000:]
        assert httpx.get(f"{url}/v2/health/ready", timeout=10).status_code == 200
        with httpx.Client(base_url=url, timeout=30) as c:
            r = c.post("/v2/models/digits/infer", json=_body(x[:2]))
            assert r.status_code == 200 and r.json()["parameters"]["artifact"] == INT8_ID
            meta = c.get("/v2/models/digits").json()
            assert meta["drift_guard"]["sample"] == 0.5 and meta["replica"]["engine"] == "ray-serve"
            assert _wait(lambda: len(c.get("/v2/models/digits").json()["replicas"]) == 2, timeout=10)
            assert c.get("/v2/models/demo").status_code == 404
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        reader.join(10)
    err = "".join(lines)
    assert proc.returncode == 0, err[-3000:]
    assert f"ready on http://127.0.0.1:{port}" in err and "2 replicas" in err, err[-3000:]


@pytest.fixture(scope="module")
def ray_server(digits_bundle):
    """Two replicas of the digits bundle on a local Ray (loopback); replica 0's INT8 artifact crashes after 10
    answers. Shut down (Ray and all) at the end of the module."""
    pytest.importorskip("ray.serve")
    import ray
    import ray.cloudpickle

    from qdeploy.serve.ray_serve import start_ray_server

    if ray.is_initialized():  # another module's Ray (the fan-out's): one Ray at a time, and this one ours
        ray.shutdown()
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the fault hook travels to the replicas
    server = start_ray_server(digits_bundle, replicas=2, port=0, options={"drift_sample": 0.0},
                              setup=fault_in_rank_0)
    try:
        yield server
    finally:
        server.stop()
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    assert not ray.is_initialized()


@pytest.mark.slow
def test_fault_in_one_replica_zero_failed_requests_and_the_demotion_is_visible(ray_server, digits_bundle):
    import httpx

    from qdeploy.bundle import Bundle

    x = Bundle.load(digits_bundle).samples()[f"input:{INPUT}"]
    url, name = ray_server.url, ray_server.model_name
    results: list = []

    def demoted(c) -> dict | None:
        meta = c.get(f"/v2/models/{name}").json()
        return next((r for r in meta["replicas"] if r["demotions"]), None)

    with httpx.Client(base_url=url, timeout=30) as c:
        for _ in range(4):  # bounded: 4 clients x 50 requests a round, until replica 0 took enough to fail
            clients = [threading.Thread(target=_client_load, args=(url, name, x, 50, results)) for _ in range(4)]
            for t in clients:
                t.start()
            for t in clients:
                t.join(120)
            if _wait(lambda: demoted(c) is not None, timeout=3):
                break
        assert [r for r in results if r[0] != 200] == [], "a request failed at the client"
        assert {a for _, a in results} <= {INT8_ID, REF_ID}
        bad = demoted(c)
        assert bad is not None and bad["rank"] == 0 and bad["active_artifact"] == REF_ID
        assert bad["demotions"] == [{"artifact": INT8_ID, "reason": "RUNTIME_ERROR", "count": 1}]
        meta = c.get(f"/v2/models/{name}").json()
        good = next(r for r in meta["replicas"] if r["replica"] != bad["replica"])
        assert good["active_artifact"] == INT8_ID and good["demotions"] == [] and good["ready"]
        assert meta["replica"]["ha_proxy"] is True and meta["replica"]["throughput_optimized"] is True

        own = None  # the faulty replica's own answer (the balancer picks who answers: new connections)
        for _ in range(40):
            m = httpx.get(f"{url}/v2/models/{name}", timeout=30).json()
            if m["replica"]["id"] == bad["replica"]:
                own = m
                break
        assert own is not None, "the balancer never sent a metadata request to replica 0"
        assert own["active_artifact"] == REF_ID and own["replica"]["rank"] == 0
        [ev] = [e for e in own["events"] if e["code"] == "RUNTIME_ERROR"]
        assert ev["artifact"] == INT8_ID and ev["active"] == REF_ID and "crashed in replica" in ev["message"]
        chain = {s["id"]: s for s in own["chain"]}
        assert chain[INT8_ID]["state"] == "failed" and chain[INT8_ID]["reason"] == "RUNTIME_ERROR"

        rid, other = bad["replica"], good["replica"]

        def served(text: str) -> float:
            return sum(_metric(text, "qdeploy_requests_total", replica=r, artifact=a, status="200") or 0
                       for r in (rid, other) for a in (INT8_ID, REF_ID))

        # the other replica's series are as of its last push (each second): within a few, every answer is counted
        assert _wait(lambda: served(c.get("/metrics").text) == len(results), timeout=5, step=0.5)
        text = c.get("/metrics").text
        assert _metric(text, "qdeploy_demotions_total", replica=rid, artifact=INT8_ID, reason="RUNTIME_ERROR") == 1
        assert _metric(text, "qdeploy_demotions_all_total", replica=other) == 0
        assert _metric(text, "qdeploy_active_artifact", replica=rid, artifact=REF_ID) == 1
        assert _metric(text, "qdeploy_active_artifact", replica=other, artifact=INT8_ID) == 1
        assert 0 <= _metric(text, "qdeploy_replica_snapshot_age_seconds", replica=other) < 3
        assert _metric(text, "qdeploy_replica_up", replica=rid) == 1 and _metric(text, "qdeploy_replica_up",
                                                                                  replica=other) == 1


@pytest.mark.slow
def test_the_v2_routes_are_the_single_process_ones(ray_server, digits_bundle):
    import httpx

    from qdeploy.bundle import Bundle

    x = Bundle.load(digits_bundle).samples()[f"input:{INPUT}"][:3]
    name = ray_server.model_name
    with httpx.Client(base_url=ray_server.url, timeout=30) as c:
        assert c.get("/v2").json()["extensions"] == ["binary_tensor_data"]
        assert c.get("/v2/health/live").json() == {"live": True}
        assert c.get("/v2/health/ready").json() == {"ready": True}
        assert c.get(f"/v2/models/{name}/versions/1/ready").json() == {"name": name, "ready": True}
        r = c.post(f"/v2/models/{name}/infer", json={**_body(x), "id": "req-7"}, headers={"X-Request-ID": "h-7"})
        assert r.status_code == 200 and r.json()["id"] == "req-7"
        assert r.headers.get_list("x-request-id") == ["h-7"]  # echoed once (by Serve), as the single process does
        assert np.asarray(r.json()["outputs"][0]["data"]).reshape(r.json()["outputs"][0]["shape"]).shape[0] == 3
        head = json.dumps({"inputs": [{"name": INPUT, "shape": list(x.shape), "datatype": "FP32",
                                       "parameters": {"binary_data_size": x.nbytes}}],
                           "parameters": {"binary_data_output": True}}).encode()
        r = c.post(f"/v2/models/{name}/infer", content=head + x.tobytes(),
                   headers={"Inference-Header-Content-Length": str(len(head)),
                            "Content-Type": "application/octet-stream"})
        assert r.status_code == 200 and int(r.headers["inference-header-content-length"]) > 0
        r = c.post(f"/v2/models/{name}/infer", json=_body(np.zeros((1, 1, 8, 9), np.float32)))
        assert r.status_code == 400 and "dimension 3 must be 8" in r.json()["error"]
        r = c.get("/v2/models/nope")
        assert r.status_code == 404 and "is not served here" in r.json()["error"]
