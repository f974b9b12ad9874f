"""Fallback-aware serving: the in-process core, the v2 HTTP server, tritonclient, faults, drift, bad requests.

Every server listens on 127.0.0.1 on a free port (in a thread of this process, or one CLI subprocess) and is
always stopped; request counts are bounded. Bundles are built once per session into pytest tmp dirs, and the
multi-artifact / drift / broken variants are test-made copies re-written with ``write_manifest``.
"""
from __future__ import annotations

import gzip
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import host_x86_profile

ROOT = Path(__file__).resolve().parent.parent
INPUT = "input"
FP32_ID = "onnxruntime-cpu-fp32"
INT8_ID = "onnxruntime-cpu-int8"


# ----------------------------------------------------------------------------------------------- bundles
def _out(bundle: Path) -> str:
    """The model's (first) output name, as the bundle records it."""
    return json.loads((Path(bundle) / "manifest.json").read_text())["model"]["outputs"][0]["name"]


@pytest.fixture(scope="session")
def base_bundle(tmp_path_factory) -> Path:
    """A real deploy of the digits example with the onnxruntime backend: one INT8 artifact."""
    import importlib.util

    import qdeploy

    tmp = tmp_path_factory.mktemp("serve")
    spec = importlib.util.spec_from_file_location("digits_example", ROOT / "examples" / "digits.py")
    digits = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(digits)
    data = digits.prepare(tmp / "data")
    qdeploy.deploy(f"{ROOT}/examples/digits.py:build_model", target=host_x86_profile(),
                   spec=str(ROOT / "examples" / "digits_spec.toml"), calib=str(data / "calib.npz"),
                   val=str(data / "val.npz"), output=tmp / "demo", input_shape="1x1x8x8", backends=["onnxruntime"])
    return tmp / "demo"


def _copy(src: Path, dest: Path) -> tuple[Path, dict]:
    shutil.copytree(src, dest)
    return dest, json.loads((dest / "manifest.json").read_text())


def _add_artifact(bundle: Path, manifest: dict, ident: str, onnx_model, index: int | None = None,
                  backend: str = "onnxruntime", sample_scale: float = 1.0) -> None:
    """Write ``onnx_model`` as a new artifact, record its outputs on the stored samples, rewrite the manifest."""
    import onnx
    import onnxruntime as ort

    from qdeploy.bundle import path_sha256, write_manifest

    path = bundle / "artifacts" / f"{ident}.onnx"
    onnx.save(onnx_model, str(path))
    samples = dict(np.load(bundle / "samples.npz"))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = _out(bundle)
    samples[f"{ident}:{out}"] = sess.run([out], {INPUT: samples[f"input:{INPUT}"]})[0] * sample_scale
    np.savez(bundle / "samples.npz", **samples)
    entry = json.loads(json.dumps(manifest["artifacts"][0]))
    entry.update(id=ident, backend=backend, precision="fp32", path=f"artifacts/{ident}.onnx",
                 sha256=path_sha256(path))
    manifest["artifacts"].insert(len(manifest["artifacts"]) if index is None else index, entry)
    write_manifest(bundle, manifest)


@pytest.fixture(scope="session")
def chain_bundle(base_bundle, tmp_path_factory) -> Path:
    """INT8 first, then an FP32 artifact (a copy of the reference), then the reference as final fallback."""
    import onnx

    bundle, manifest = _copy(base_bundle, tmp_path_factory.mktemp("chain") / "demo")
    _add_artifact(bundle, manifest, FP32_ID, onnx.load(str(bundle / "reference.onnx")))
    return bundle


def _perturbed(reference: Path, bias: np.ndarray):
    """The reference with a constant added to its logits: it flips most top-1 answers."""
    import onnx
    from onnx import helper, numpy_helper

    m = onnx.load(str(reference))
    name = m.graph.output[0].name
    for node in m.graph.node:
        node.output[:] = [f"{name}_pre" if o == name else o for o in node.output]
    m.graph.initializer.append(numpy_helper.from_array(bias.astype(np.float32), "drift_bias"))
    m.graph.node.append(helper.make_node("Add", [f"{name}_pre", "drift_bias"], [name], name="drift_add"))
    onnx.checker.check_model(m)
    return m


@pytest.fixture(scope="session")
def drift_bundle(base_bundle, tmp_path_factory) -> Path:
    """A first artifact whose outputs are far outside the budget (its warm-up matches its own record, so it
    loads; only the drift guard, comparing live outputs with the FP32 reference, can catch it)."""
    bundle, manifest = _copy(base_bundle, tmp_path_factory.mktemp("drift") / "demo")
    bias = np.zeros(10, np.float32)
    bias[3] = 1000.0
    _add_artifact(bundle, manifest, "perturbed-int8", _perturbed(bundle / "reference.onnx", bias), index=0)
    return bundle


@pytest.fixture()
def val_inputs(base_bundle) -> np.ndarray:
    from qdeploy.bundle import Bundle

    return Bundle.load(base_bundle).samples()[f"input:{INPUT}"]


# ----------------------------------------------------------------------------------------------- helpers
def _server(bundle, max_body=None, **options):
    from qdeploy.serve import FallbackModel, start_server

    model = FallbackModel(bundle, **options)
    kw = {"max_body": max_body} if max_body else {}
    return model, start_server(model, **kw)


def _wait(cond, timeout=15.0, step=0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(step)
    return False


def _infer_body(x: np.ndarray, rid: str | None = None) -> dict:
    body = {"inputs": [{"name": INPUT, "shape": list(x.shape), "datatype": "FP32", "data": x.ravel().tolist()}]}
    if rid:
        body["id"] = rid
    return body


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _metric(text: str, name: str, **labels) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
    return None


# ----------------------------------------------------------------------------------------------- in-process core
def test_import_stays_light():
    code = ("import sys, qdeploy, qdeploy.serve; heavy = [m for m in ('fastapi', 'uvicorn', 'prometheus_client', "
            "'starlette', 'onnxruntime', 'torch') if m in sys.modules]; print(heavy); assert not heavy")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=60)


def test_python_api_serves_int8_and_matches_the_artifact(base_bundle, val_inputs):
    import qdeploy.serve
    from qdeploy.bundle import Bundle

    model = qdeploy.serve.load(base_bundle, drift_sample=0)
    try:
        out = model.infer({INPUT: val_inputs})
        assert out.artifact == INT8_ID and model.active == INT8_ID
        want = Bundle.load(base_bundle).runner(INT8_ID).infer({INPUT: val_inputs})[_out(base_bundle)]
        np.testing.assert_array_equal(out[_out(base_bundle)], want)
        assert [s["id"] for s in model.status()["chain"]] == [INT8_ID, "reference-fp32"]
        assert model.status()["chain"][-1]["final_fallback"] is True
        with pytest.raises(qdeploy.serve.RequestError, match="dtype float64; model demo takes float32"):
            model.infer({INPUT: val_inputs.astype(np.float64)})
        with pytest.raises(qdeploy.serve.RequestError, match=r"unknown input\(s\) \['x'\]"):
            model.infer({"x": val_inputs})
        with pytest.raises(qdeploy.serve.RequestError, match="dimension 2 must be 8"):
            model.infer({INPUT: np.zeros((1, 1, 7, 8), np.float32)})
    finally:
        model.close()


def test_load_failures_demote_at_start_with_reason_codes(chain_bundle, tmp_path, val_inputs):
    from qdeploy.bundle import write_manifest
    from qdeploy.serve import FallbackModel

    bundle, manifest = _copy(chain_bundle, tmp_path / "demo")
    manifest["artifacts"][0]["backend"] = "no-such-backend"  # not installed here
    samples = dict(np.load(bundle / "samples.npz"))
    key = f"{FP32_ID}:{_out(bundle)}"
    samples[key] = samples[key] + 5.0  # verified outputs it cannot match
    np.savez(bundle / "samples.npz", **samples)
    write_manifest(bundle, manifest)
    with FallbackModel(bundle, drift_sample=0) as model:
        assert model.active == "reference-fp32"
        events = {e.artifact: e for e in model.events}
        assert events[INT8_ID].code == "BACKEND_UNAVAILABLE" and "no-such-backend" in events[INT8_ID].message
        assert events[FP32_ID].code == "LOAD_FAILED" and "warm-up output" in events[FP32_ID].message
        assert model.infer({INPUT: val_inputs[:2]}).artifact == "reference-fp32"


def test_nothing_serves_and_strict_refuses_to_demote_at_start(chain_bundle, tmp_path):
    from qdeploy.bundle import write_manifest
    from qdeploy.serve import FallbackModel, NothingServes

    bundle, manifest = _copy(chain_bundle, tmp_path / "demo")
    for art in manifest["artifacts"]:
        art["backend"] = "no-such-backend"
    write_manifest(bundle, manifest)
    with pytest.raises(NothingServes, match="policy strict: no fallback"):
        FallbackModel(bundle, policy="strict").start()
    with pytest.raises(NothingServes, match="no artifact of bundle .* is ready on this host"):
        FallbackModel(bundle, reference_fallback=False).start()


def test_tampered_bundle_is_refused(base_bundle, tmp_path):
    from qdeploy.errors import BundleError
    from qdeploy.serve import FallbackModel

    bundle, manifest = _copy(base_bundle, tmp_path / "demo")
    art = bundle / manifest["artifacts"][0]["path"]
    art.write_bytes(art.read_bytes()[:-1] + b"\0")
    with pytest.raises(BundleError, match="sha256"):
        FallbackModel(bundle)
    proc = subprocess.run([sys.executable, "-m", "qdeploy.cli", "serve", str(bundle), "--port", str(_free_port())],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 1  # integrity: a failed check, not a typo
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "sha256" in lines[0] and lines[0].startswith("qdeploy: error:"), proc.stderr


# ----------------------------------------------------------------------------------------------- HTTP server
def test_v2_endpoints_json_and_request_id(base_bundle, val_inputs):
    import httpx

    model, srv = _server(base_bundle, drift_sample=0)
    try:
        with httpx.Client(base_url=srv.url, timeout=10) as c:
            assert _wait(lambda: c.get("/v2/health/ready").status_code == 200)
            assert c.get("/v2/health/live").json() == {"live": True}
            assert "binary_tensor_data" in c.get("/v2").json()["extensions"]
            meta = c.get("/v2/models/demo").json()
            assert meta["active_artifact"] == INT8_ID
            assert meta["inputs"] == [{"name": INPUT, "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
            assert meta["outputs"][0]["name"] == _out(base_bundle)
            assert c.get("/v2/models/demo/ready").status_code == 200
            r = c.post("/v2/models/demo/infer", json=_infer_body(val_inputs[:3], rid="req-7"),
                       headers={"X-Request-ID": "hdr-7"})
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["id"] == "req-7" and r.headers["x-request-id"] == "hdr-7"
            assert body["parameters"]["artifact"] == INT8_ID
            out = np.array(body["outputs"][0]["data"], np.float32).reshape(body["outputs"][0]["shape"])
            np.testing.assert_allclose(out, model.infer({INPUT: val_inputs[:3]})[_out(base_bundle)], rtol=1e-6)
            text = c.get("/metrics").text
            assert _metric(text, "qdeploy_requests_total", artifact=INT8_ID, status="200") == 1.0
            assert _metric(text, "qdeploy_active_artifact", artifact=INT8_ID) == 1.0
            assert _metric(text, "qdeploy_request_duration_seconds_count") == 1.0
    finally:
        srv.stop()
        model.close()


def test_tritonclient_json_and_binary(base_bundle, val_inputs):
    tc = pytest.importorskip("tritonclient.http")
    model, srv = _server(base_bundle, drift_sample=0)
    client = tc.InferenceServerClient(url=srv.url.removeprefix("http://"))
    try:
        assert _wait(client.is_server_ready)
        assert client.is_server_live() and client.is_model_ready("demo")
        assert client.get_model_metadata("demo")["active_artifact"] == INT8_ID
        x = val_inputs[:4]
        out = _out(base_bundle)
        want = model.infer({INPUT: x})[out]
        for binary in (False, True):
            inp = tc.InferInput(INPUT, list(x.shape), "FP32")
            inp.set_data_from_numpy(x, binary_data=binary)
            res = client.infer("demo", [inp], outputs=[tc.InferRequestedOutput(out, binary_data=binary)],
                               request_id=f"tc-{binary}")
            np.testing.assert_allclose(res.as_numpy(out), want, rtol=1e-6)
            resp = res.get_response()
            assert resp["id"] == f"tc-{binary}" and resp["parameters"]["artifact"] == INT8_ID
        inp = tc.InferInput(INPUT, list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=True)
        res = client.infer("demo", [inp], request_compression_algorithm="gzip")  # all outputs, binary by default
        np.testing.assert_allclose(res.as_numpy(out), want, rtol=1e-6)
        from tritonclient.utils import InferenceServerException

        bad = tc.InferInput(INPUT, [1, 1, 8, 9], "FP32")
        bad.set_data_from_numpy(np.zeros((1, 1, 8, 9), np.float32), binary_data=True)
        with pytest.raises(InferenceServerException, match="dimension 3 must be 8"):
            client.infer("demo", [bad])
    finally:
        client.close()
        srv.stop()
        model.close()


def test_bad_requests_get_4xx_with_one_clear_error(base_bundle, val_inputs):
    import httpx

    model, srv = _server(base_bundle, drift_sample=0, max_body=4096)
    good = _infer_body(val_inputs[:1])

    def with_input(**kw):
        return {"inputs": [{**good["inputs"][0], **kw}]}

    head = json.dumps({"inputs": [{"name": INPUT, "shape": [1, 1, 8, 8], "datatype": "FP32",
                                   "parameters": {"binary_data_size": 12}}]}).encode()
    cases = [  # (what, request kwargs, status, text the error must contain)
        ("not JSON", dict(content=b"{nope"), 400, "not valid JSON"),
        ("JSON but no inputs", dict(json={"outputs": []}), 400, "no 'inputs' list"),
        ("wrong input name", dict(json=with_input(name="image")), 400, "unknown input 'image'"),
        ("wrong shape", dict(json=with_input(shape=[1, 1, 8, 7])), 400, "dimension 3 must be 8"),
        ("wrong rank", dict(json=with_input(shape=[64])), 400, "takes 4 dimensions"),
        ("wrong datatype", dict(json=with_input(datatype="INT64")), 400, "datatype 'INT64'; the model takes FP32"),
        ("data count", dict(json=with_input(data=[0.5] * 10)), 400, "has 10 values; shape [1, 1, 8, 8] needs 64"),
        ("data not numbers", dict(json=with_input(data=["a"] * 64)), 400, "not a list of FP32 numbers"),
        ("unknown output", dict(json={**good, "outputs": [{"name": "logits"}]}), 400, "unknown output 'logits'"),
        ("binary size mismatch", dict(content=head + b"\0" * 12,
                                      headers={"Inference-Header-Content-Length": str(len(head))}), 400,
         "binary_data_size 12 bytes does not match"),
        ("bad header length", dict(content=b"{}", headers={"Inference-Header-Content-Length": "99"}), 400,
         "does not fit"),
        ("oversized body", dict(content=b"{" + b" " * 5000 + b"}"), 413, "at most 4096"),
        ("oversized chunked body", dict(content=iter([b"{" + b" " * 3000, b" " * 3000 + b"}"])), 413,
         "larger than 4096"),
        ("gzip bomb", dict(content=gzip.compress(b" " * 100_000), headers={"Content-Encoding": "gzip"}), 413,
         "decompressed body is larger"),
        ("unknown encoding", dict(content=b"{}", headers={"Content-Encoding": "br"}), 415, "'br' is not supported"),
    ]
    try:
        with httpx.Client(base_url=srv.url, timeout=10) as c:
            assert _wait(lambda: c.get("/v2/health/ready").status_code == 200)
            for what, kw, status, text in cases:
                r = c.post("/v2/models/demo/infer", **kw)
                assert r.status_code == status, (what, r.status_code, r.text)
                assert set(r.json()) == {"error"} and text in r.json()["error"], (what, r.text)
            r = c.post("/v2/models/nope/infer", json=good)
            assert r.status_code == 404 and "'nope' is not served here" in r.json()["error"]
            assert c.get("/v2/models/nope").status_code == 404
            r = c.post("/v2/models/demo/versions/7/infer", json=good)
            assert r.status_code == 404 and "no version '7'" in r.json()["error"]
            r = c.get("/v2/models/demo/infer")
            assert r.status_code == 405 and "error" in r.json()
            assert c.get("/v3").status_code == 404
            r = c.post("/v2/models/demo/infer", json=good)  # still serving after all of that
            assert r.status_code == 200 and r.json()["parameters"]["artifact"] == INT8_ID
            text = c.get("/metrics").text
            assert _metric(text, "qdeploy_requests_total", status="400") >= 10
            assert _metric(text, "qdeploy_requests_total", status="500") is None
    finally:
        srv.stop()
        model.close()


def test_readiness_waits_for_warm_up(base_bundle, val_inputs, monkeypatch):
    import httpx

    from qdeploy.serve import core

    gate = threading.Event()
    original = core.FallbackModel._warm_up

    def slow_warm_up(self, slot, runner, samples):
        gate.wait(20)
        return original(self, slot, runner, samples)

    monkeypatch.setattr(core.FallbackModel, "_warm_up", slow_warm_up)
    model, srv = _server(base_bundle, drift_sample=0)
    try:
        with httpx.Client(base_url=srv.url, timeout=10) as c:
            assert c.get("/v2/health/live").status_code == 200
            r = c.get("/v2/health/ready")
            assert r.status_code == 400 and r.json()["ready"] is False and "warming up" in r.json()["error"]
            assert c.get("/v2/models/demo/ready").status_code == 400
            r = c.post("/v2/models/demo/infer", json=_infer_body(val_inputs[:1]))
            assert r.status_code == 503 and "warming up" in r.json()["error"]
            gate.set()
            assert _wait(lambda: c.get("/v2/health/ready").status_code == 200)
            assert c.post("/v2/models/demo/infer", json=_infer_body(val_inputs[:1])).status_code == 200
    finally:
        gate.set()
        srv.stop()
        model.close()


# ----------------------------------------------------------------------------------------------- faults and drift
def _load(url: str, x: np.ndarray, n: int, results: list, started: threading.Event | None = None,
          go_on: threading.Event | None = None) -> None:
    """``n`` requests in a row; after the 6th, say so (``started``) and wait for ``go_on`` (the fault is in
    place), so the fault always lands while this client still has most of its requests to send."""
    import httpx

    with httpx.Client(base_url=url, timeout=10) as c:
        for i in range(n):
            try:
                r = c.post("/v2/models/demo/infer", json=_infer_body(x[i % len(x)][None]))
                results.append((r.status_code, r.json().get("parameters", {}).get("artifact")))
            except Exception as exc:  # a dropped connection is a failed request too
                results.append((-1, repr(exc)))
            if started is not None and i == 5:
                started.set()
                if go_on is not None:
                    go_on.wait(30)


def test_runtime_errors_demote_under_load_with_zero_failed_requests(chain_bundle, val_inputs, monkeypatch):
    import httpx

    model, srv = _server(chain_bundle, drift_sample=0, breaker_errors=3, breaker_window=20)
    try:
        assert _wait(lambda: model.ready)
        results: list = []
        started = [threading.Event() for _ in range(2)]
        go_on = threading.Event()
        clients = [threading.Thread(target=_load, args=(srv.url, val_inputs, 60, results, s, go_on))
                   for s in started]
        for t in clients:
            t.start()
        assert all(s.wait(20) for s in started)
        int8 = model.slots[0]
        assert int8.id == INT8_ID

        def broken(feed):  # the test's hook: the production code exposes no way to inject errors
            raise RuntimeError("injected: the INT8 kernel crashed")

        monkeypatch.setattr(int8.runner, "infer_impl", broken)
        go_on.set()
        for t in clients:
            t.join(60)
        assert len(results) == 120
        assert [r for r in results if r[0] != 200] == [], "a request failed at the client"
        assert results[-1][1] == FP32_ID
        with httpx.Client(base_url=srv.url, timeout=10) as c:
            meta = c.get("/v2/models/demo").json()
            assert meta["active_artifact"] == FP32_ID
            ev = [e for e in meta["events"] if e["code"] == "RUNTIME_ERROR"]
            assert len(ev) == 1 and ev[0]["artifact"] == INT8_ID and ev[0]["active"] == FP32_ID
            assert "injected" in ev[0]["message"] and "now serving onnxruntime-cpu-fp32" in ev[0]["message"]
            chain = {s["id"]: s for s in meta["chain"]}
            assert chain[INT8_ID]["state"] == "failed" and chain[INT8_ID]["reason"] == "RUNTIME_ERROR"
            text = c.get("/metrics").text
            assert _metric(text, "qdeploy_demotions_total", artifact=INT8_ID, reason="RUNTIME_ERROR") == 1.0
            assert _metric(text, "qdeploy_active_artifact", artifact=FP32_ID) == 1.0
            assert _metric(text, "qdeploy_active_artifact", artifact=INT8_ID) == 0.0
            assert _metric(text, "qdeploy_requests_total", artifact=FP32_ID, status="200") >= 1
    finally:
        srv.stop()
        model.close()


def test_strict_never_demotes_it_fails_loudly(chain_bundle, val_inputs, monkeypatch):
    import httpx

    model, srv = _server(chain_bundle, policy="strict", drift_sample=0, breaker_errors=2)
    try:
        assert _wait(lambda: model.ready)
        assert [s.id for s in model.slots] == [INT8_ID]

        def broken(feed):
            raise RuntimeError("injected failure")

        monkeypatch.setattr(model.slots[0].runner, "infer_impl", broken)
        with httpx.Client(base_url=srv.url, timeout=10) as c:
            for _ in range(2):
                r = c.post("/v2/models/demo/infer", json=_infer_body(val_inputs[:1]))
                assert r.status_code == 500 and "policy strict" in r.json()["error"]
            r = c.post("/v2/models/demo/infer", json=_infer_body(val_inputs[:1]))
            assert r.status_code == 503 and "RUNTIME_ERROR" in r.json()["error"]
            assert c.get("/v2/health/ready").status_code == 400
            meta = c.get("/v2/models/demo").json()
            assert meta["active_artifact"] is None and "policy strict" in meta["failure"]
            assert _metric(c.get("/metrics").text, "qdeploy_demotions_all_total") == 0.0
    finally:
        srv.stop()
        model.close()


def test_drift_guard_demotes_a_drifting_artifact_within_the_window(drift_bundle, val_inputs):
    import httpx

    window = 16
    model, srv = _server(drift_bundle, drift_sample=1.0, drift_window=window)
    try:
        assert _wait(lambda: model.ready) and model.active == "perturbed-int8"
        assert model.wait_loaded(60)  # the INT8 link is warm: the demotion lands on it, not on the reference
        answered = []
        with httpx.Client(base_url=srv.url, timeout=10) as c:
            for i in range(window):
                r = c.post("/v2/models/demo/infer", json=_infer_body(val_inputs[i % 8][None]))
                assert r.status_code == 200
                answered.append(r.json()["parameters"]["artifact"])
            assert _wait(lambda: model.active != "perturbed-int8", timeout=10)
            meta = c.get("/v2/models/demo").json()
            assert meta["active_artifact"] == INT8_ID
            ev = [e for e in meta["events"] if e["code"] == "DRIFT_DETECTED"]
            assert len(ev) == 1 and ev[0]["artifact"] == "perturbed-int8"
            assert f"on {window} live samples" in ev[0]["message"]
            r = c.post("/v2/models/demo/infer", json=_infer_body(val_inputs[:1]))
            assert r.json()["parameters"]["artifact"] == INT8_ID
            text = c.get("/metrics").text
            assert _metric(text, "qdeploy_demotions_total", artifact="perturbed-int8", reason="DRIFT_DETECTED") == 1
            assert _metric(text, "qdeploy_drift_checks_total") >= 1
        assert answered[0] == "perturbed-int8"
    finally:
        srv.stop()
        model.close()


def test_a_link_ready_after_a_demotion_takes_over_in_chain_order(drift_bundle):
    """A demotion while the next link is still loading lands on what is ready (here the FP32 reference); when
    the earlier link finishes its warm-up it takes over: the chain's order wins, not load timing."""
    from qdeploy.serve import FallbackModel

    model = FallbackModel(drift_bundle, drift_sample=0)
    try:
        samples = model.bundle.samples()
        first, second, ref = model.slots[0], model.slots[1], model.slots[-1]
        assert (first.id, second.id, ref.is_reference) == ("perturbed-int8", INT8_ID, True)
        model._load(first, samples)
        model._load(ref, samples)
        model._fail(first, "DRIFT_DETECTED", "test")
        assert model.active == ref.id
        model._load(second, samples)
        assert model.active == INT8_ID
    finally:
        model.close()


def test_drift_found_while_the_chain_loads_waits_for_the_next_link(drift_bundle):
    """The guard watches from the first request; a drift found while nothing after the artifact is warm yet
    does not leave the model without an answer: it keeps serving and is demoted once the next link is ready."""
    from qdeploy.serve import FallbackModel

    model = FallbackModel(drift_bundle, drift_sample=0)
    try:
        samples = model.bundle.samples()
        first, second = model.slots[0], model.slots[1]
        model._load(first, samples)
        model._on_drift(first, "top-1 disagreement 0.9 exceeds 0.01")
        assert model.active == first.id and first.state == "ready" and not model.events  # still answering
        model._load(second, samples)
        assert model.active == INT8_ID and first.state == "failed" and first.reason == "DRIFT_DETECTED"
        [ev] = model.events
        assert ev.code == "DRIFT_DETECTED" and f"now serving {INT8_ID}" in ev.message
    finally:
        model.close()


def test_drift_guard_keeps_a_healthy_artifact(base_bundle):
    """A healthy INT8 artifact on 256 distinct validation images, windows of 64: one or two flips against FP32
    (what any trained model may show) stay inside the budget, so the guard never demotes."""
    from qdeploy.serve import FallbackModel

    x = np.load(base_bundle.parent / "data" / "val.npz")["input"][:256]
    with FallbackModel(base_bundle, drift_sample=1.0, drift_window=64) as model:
        for i in range(len(x)):
            assert model.infer({INPUT: x[i][None]}).artifact == INT8_ID
            if i % 32 == 31:  # let the guard catch up: it drops samples rather than slow the requests down
                assert _wait(lambda: model.drift_status()["shadowed"] == i + 1, timeout=20)
        assert _wait(lambda: model.drift_status()["checks"] == 4, timeout=20)
        assert model.active == INT8_ID and not model.events
        assert model.slots[0].last_drift["drifted"] is False


# ----------------------------------------------------------------------------------------------- the CLI
def test_cli_serve_answers_with_the_int8_artifact(base_bundle, val_inputs):
    import httpx

    port = _free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "qdeploy.cli", "serve", str(base_bundle), "--port", str(port),
                             "--name", "digits", "--policy", "strict", "--drift-sample", "0.5", "--drift-window",
                             "32", "--breaker-errors", "2"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}"

        def ready():
            if proc.poll() is not None:  # exited: stop waiting, the assertion shows its stderr
                return True
            try:
                return httpx.get(f"{url}/v2/health/ready", timeout=1).status_code == 200
            except httpx.HTTPError:
                return False

        assert _wait(ready, timeout=60, step=0.2) and proc.poll() is None, \
            proc.stderr.read() if proc.poll() is not None else "not ready"
        r = httpx.post(f"{url}/v2/models/digits/infer", json=_infer_body(val_inputs[:2]), timeout=10)
        assert r.status_code == 200 and r.json()["parameters"]["artifact"] == INT8_ID
        meta = httpx.get(f"{url}/v2/models/digits", timeout=10).json()  # the flags reached the core
        assert meta["policy"] == "strict" and meta["active_artifact"] == INT8_ID and meta["active_budget_passed"]
        assert [link["id"] for link in meta["chain"]] == [INT8_ID]  # strict: no demotion targets, no reference
        assert meta["drift_guard"]["sample"] == 0.5 and meta["drift_guard"]["window"] == 32
        assert httpx.get(f"{url}/v2/models/demo", timeout=10).status_code == 404
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out, err = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
    assert "ready on http://127.0.0.1" in err, err


def test_serving_reason_codes_are_the_core_ones():
    from qdeploy.fallback import REASON_CODES
    from qdeploy.serve import core

    assert {core.BACKEND_UNAVAILABLE, core.LOAD_FAILED, core.RUNTIME_ERROR, core.DRIFT_DETECTED} <= set(REASON_CODES)


def test_serving_without_the_extra_says_which_to_install(monkeypatch):
    """`pip install qdeploy` has no web framework: serving over HTTP names the extra instead of a traceback."""
    import sys

    import qdeploy.serve as serving
    from qdeploy.errors import QDeployError

    monkeypatch.setitem(sys.modules, "fastapi", None)  # as if fastapi were not installed
    monkeypatch.delitem(sys.modules, "qdeploy.serve.http", raising=False)
    monkeypatch.delattr(serving, "http", raising=False)
    with pytest.raises(QDeployError, match=r"pip install 'qdeploy\[serve\]'"):
        serving.serve
