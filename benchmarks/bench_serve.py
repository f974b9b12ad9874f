"""Serving overhead: qdeploy serve vs a minimal FastAPI app around onnxruntime vs the artifact in-process.

    .venv/bin/python benchmarks/bench_serve.py [--bundle build/demo] [--concurrency 8] [--requests 2000]

Both HTTP servers run in their own process (uvicorn, one worker, same settings), serve the same artifact (the
bundle's first) and speak the same v2 JSON request; the load comes from a Python client process on loopback
(``--concurrency`` threads, keep-alive connections, ``--requests`` requests per run after a warm-up), and runs
alternate between the servers for ``--rounds`` rounds (the median round is reported). qdeploy runs with its
production defaults (drift guard sampling 5% of requests, metrics on). Prints a table and writes
``build/bench/serve.json``. Not a test: numbers depend on the machine and its load.
"""

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------- servers
def minimal_app(artifact: Path):
    """The baseline: the least a FastAPI app needs to answer a v2 JSON request with onnxruntime."""
    import onnxruntime as ort
    from fastapi import FastAPI, Request
    from fastapi.responses import Response
    from starlette.concurrency import run_in_threadpool

    sess = ort.InferenceSession(str(artifact), providers=["CPUExecutionProvider"])
    out_names = [o.name for o in sess.get_outputs()]
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

    @app.post("/v2/models/{name}/infer")
    async def infer(request: Request, name: str) -> Response:
        req = json.loads(await request.body())
        feed = {t["name"]: np.asarray(t["data"], np.float32).reshape(t["shape"]) for t in req["inputs"]}
        outs = await run_in_threadpool(sess.run, out_names, feed)
        body = {"model_name": name, "outputs": [{"name": n, "datatype": "FP32", "shape": list(o.shape),
                                                 "data": o.ravel().tolist()} for n, o in zip(out_names, outs)]}
        return Response(json.dumps(body, separators=(",", ":")).encode(), media_type="application/json")

    return app


def run_server(kind: str, bundle: Path, port: int) -> None:
    import uvicorn

    if kind == "qdeploy":
        from qdeploy.serve import FallbackModel, serve

        serve(FallbackModel(bundle), host="127.0.0.1", port=port)
        return
    from qdeploy.bundle import Bundle

    b = Bundle.load(bundle)
    app = minimal_app(b.path / b.artifacts[0]["path"])
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False,
                            lifespan="off", server_header=False)
    uvicorn.Server(config).run()


def start_server(kind: str, bundle: Path) -> tuple[subprocess.Popen, int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, __file__, "--server", kind, "--bundle", str(bundle), "--port",
                             str(port)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"{kind} server exited: {proc.stderr.read().decode()}")
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            c.request("GET", "/v2/health/ready")
            r = c.getresponse()
            r.read()
            c.close()
            if r.status == 200 or (kind == "minimal" and r.status == 404):
                return proc, port
        except OSError:
            pass
        time.sleep(0.2)
    proc.kill()
    sys.exit(f"{kind} server did not start")


# ------------------------------------------------------------------------------------------- load
def http_load(port: int, path: str, body: bytes, headers: dict, n: int, concurrency: int) -> dict:
    """``n`` POSTs from ``concurrency`` threads on keep-alive connections; requests/s and latency percentiles."""
    lat: list[float] = []
    errors = [0]
    lock = threading.Lock()
    left = [n]

    def worker() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.connect()
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # no Nagle/delayed-ACK stalls
        mine = []
        while True:
            with lock:
                if left[0] == 0:
                    break
                left[0] -= 1
            t = time.perf_counter()
            conn.request("POST", path, body, headers)
            r = conn.getresponse()
            r.read()
            mine.append(time.perf_counter() - t)
            if r.status != 200:
                errors[0] += 1
        conn.close()
        with lock:
            lat.extend(mine)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return summary(lat, wall, errors[0])


def inprocess_load(fn, n: int, concurrency: int) -> dict:
    lat: list[float] = []
    lock = threading.Lock()
    left = [n]

    def worker() -> None:
        mine = []
        while True:
            with lock:
                if left[0] == 0:
                    break
                left[0] -= 1
            t = time.perf_counter()
            fn()
            mine.append(time.perf_counter() - t)
        with lock:
            lat.extend(mine)

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return summary(lat, time.perf_counter() - start, 0)


def summary(lat: list[float], wall: float, errors: int) -> dict:
    a = np.array(lat) * 1000
    return {"requests": len(lat), "errors": errors, "rps": len(lat) / wall, "p50_ms": float(np.percentile(a, 50)),
            "p99_ms": float(np.percentile(a, 99))}


def median_run(runs: list[dict]) -> dict:
    best = sorted(runs, key=lambda r: r["rps"])[len(runs) // 2]
    return {**best, "rounds_rps": [round(r["rps"], 1) for r in runs]}


# ------------------------------------------------------------------------------------------- main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", default=str(ROOT / "build" / "demo"))
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--output", default=str(ROOT / "build" / "bench" / "serve.json"))
    ap.add_argument("--server", choices=("qdeploy", "minimal"), help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    bundle = Path(args.bundle)
    if args.server:
        run_server(args.server, bundle, args.port)
        return 0
    if not (bundle / "manifest.json").is_file():
        sys.exit(f"{bundle} is not a bundle; make one first (make demo, or qdeploy deploy ... -o {bundle})")

    from qdeploy.bundle import Bundle
    from qdeploy.serve import FallbackModel
    from qdeploy.serve.http import VERSION  # noqa: F401  (the HTTP layer imports cleanly)

    b = Bundle.load(bundle)
    name = bundle.resolve().name
    inp = b.manifest["model"]["inputs"][0]["name"]
    x = b.samples()[f"input:{inp}"][:1]
    json_body = json.dumps({"inputs": [{"name": inp, "shape": list(x.shape), "datatype": "FP32",
                                        "data": x.ravel().tolist()}]}).encode()
    head = json.dumps({"inputs": [{"name": inp, "shape": list(x.shape), "datatype": "FP32",
                                   "parameters": {"binary_data_size": x.nbytes}}],
                       "parameters": {"binary_data_output": True}}).encode()
    bin_body = head + x.tobytes()
    path = f"/v2/models/{name}/infer"
    jh = {"Content-Type": "application/json"}
    bh = {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(head))}
    n, c = args.requests, args.concurrency

    results: dict[str, list[dict]] = {"minimal FastAPI + onnxruntime (JSON)": [], "qdeploy serve (JSON)": [],
                                      "qdeploy serve (binary)": []}
    servers = {k: start_server(k, bundle) for k in ("minimal", "qdeploy")}
    try:
        for kind, (_, port) in servers.items():  # warm-up, and a correctness check
            r = http_load(port, path, json_body, jh, 200, c)
            if r["errors"]:
                sys.exit(f"{kind}: {r['errors']} of 200 warm-up requests failed")
        for _ in range(args.rounds):
            results["minimal FastAPI + onnxruntime (JSON)"].append(
                http_load(servers["minimal"][1], path, json_body, jh, n, c))
            results["qdeploy serve (JSON)"].append(http_load(servers["qdeploy"][1], path, json_body, jh, n, c))
            results["qdeploy serve (binary)"].append(http_load(servers["qdeploy"][1], path, bin_body, bh, n, c))
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(10)

    import onnxruntime as ort

    sess = ort.InferenceSession(str(b.path / b.artifacts[0]["path"]), providers=["CPUExecutionProvider"])
    model = FallbackModel(b, drift_sample=0).start()
    feed = {inp: x}
    inproc = {"in-process onnxruntime session": lambda: sess.run(None, feed),
              "in-process qdeploy.serve.load().infer": lambda: model.infer(feed)}
    for label, fn in inproc.items():
        inprocess_load(fn, 500, c)
        results[label] = [inprocess_load(fn, n * 5, c) for _ in range(args.rounds)]
    model.close()

    table = {k: median_run(v) for k, v in results.items()}
    base, ours = table["minimal FastAPI + onnxruntime (JSON)"], table["qdeploy serve (JSON)"]
    overhead = base["rps"] / ours["rps"] - 1
    print(f"\n{name}: artifact {b.artifacts[0]['id']}, 1 sample per request, concurrency {c}, loopback, "
          f"{os.cpu_count()} CPUs, median of {args.rounds} rounds\n")
    print(f"{'':<40} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}")
    for k, r in table.items():
        print(f"{k:<40} {r['rps']:>9.0f} {r['p50_ms']:>8.3f} {r['p99_ms']:>8.3f} {r['errors']:>7}")
    verdict = "within" if overhead <= 0.10 else "OVER"
    print(f"\nqdeploy serve overhead vs the minimal app (throughput, JSON): {overhead * 100:+.1f}% "
          f"({verdict} the 10% budget)")
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"bundle": str(bundle), "artifact": b.artifacts[0]["id"], "concurrency": c,
                               "requests_per_round": n, "rounds": args.rounds, "cpus": os.cpu_count(),
                               "results": table, "overhead_vs_minimal": overhead}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
