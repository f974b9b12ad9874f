"""Serving overhead: qdeploy serve vs a minimal FastAPI app around onnxruntime vs the artifact in-process.

    .venv/bin/python benchmarks/bench_serve.py [--bundle BUNDLE] [--concurrency 8] [--requests 2000]

Both HTTP servers run in their own process (uvicorn, one worker, same settings), serve the same artifact (the
bundle's first) and speak the same v2 JSON request; the load comes from a Python client process on loopback
(``--concurrency`` threads, keep-alive connections, ``--requests`` requests per run after a warm-up), and runs
alternate between the servers for ``--rounds`` rounds (the median round is reported, with the server process's CPU time per request, which other
load on the machine disturbs far less than throughput). qdeploy runs with its
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
def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def drive(n: int, concurrency: int, open_client) -> tuple[list[float], int, float]:
    """``n`` calls shared by ``concurrency`` threads; ``open_client()`` gives each thread ``(call, close)``,
    ``call()`` returning True for a good answer. Returns the latencies, the error count and the wall time."""
    lat: list[float] = []
    errors = [0]
    lock = threading.Lock()
    left = [n]

    def worker() -> None:
        call, close = open_client()
        mine, bad = [], 0
        while True:
            with lock:
                if left[0] == 0:
                    break
                left[0] -= 1
            t = time.perf_counter()
            ok = call()
            mine.append(time.perf_counter() - t)
            bad += not ok
        close()
        with lock:
            lat.extend(mine)
            errors[0] += bad

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return lat, errors[0], time.perf_counter() - start


def http_load(port: int, path: str, body: bytes, headers: dict, n: int, concurrency: int,
              pid: int | None = None) -> dict:
    """``n`` POSTs from ``concurrency`` threads on keep-alive connections: requests/s, latency percentiles and
    (with ``pid``) the server's CPU time per request, which other load on the machine disturbs far less."""

    def open_client():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.connect()
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # no Nagle/delayed-ACK stalls

        def call() -> bool:
            conn.request("POST", path, body, headers)
            r = conn.getresponse()
            r.read()
            return r.status == 200
        return call, conn.close

    cpu0 = cpu_seconds(pid) if pid else 0.0
    lat, errors, wall = drive(n, concurrency, open_client)
    out = summary(lat, wall, errors)
    if pid:
        out["server_cpu_us_per_request"] = (cpu_seconds(pid) - cpu0) / max(len(lat), 1) * 1e6
    return out


def inprocess_load(fn, n: int, concurrency: int) -> dict:
    """The same load on an in-process callable (an exception ends the run: it is a bug, not an answer)."""

    def open_client():
        def call() -> bool:
            fn()
            return True
        return call, lambda: None

    lat, errors, wall = drive(n, concurrency, open_client)
    return summary(lat, wall, errors)


def asgi_cpu_us(app, path: str, body: bytes, n: int) -> float:
    """CPU time (all threads of this process) per request when ``app`` is called through ASGI directly, one
    request at a time: the app's own cost, without uvicorn, sockets or the client, so far less noisy."""
    import asyncio

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    status: list[int] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            status.append(message["status"])

    async def run() -> float:
        for _ in range(100):
            await app(dict(scope), receive, send)
        start = time.process_time()
        for _ in range(n):
            await app(dict(scope), receive, send)
        return (time.process_time() - start) / n * 1e6

    us = asyncio.run(run())
    if set(status) != {200}:
        sys.exit(f"ASGI run got statuses {sorted(set(status))}")
    return us


def summary(lat: list[float], wall: float, errors: int) -> dict:
    a = np.array(lat) * 1000
    return {"requests": len(lat), "errors": errors, "rps": len(lat) / wall, "p50_ms": float(np.percentile(a, 50)),
            "p99_ms": float(np.percentile(a, 99))}


def median_run(runs: list[dict]) -> dict:
    """The round with the median throughput, plus every round's throughput and the median server CPU time."""
    best = dict(sorted(runs, key=lambda r: r["rps"])[len(runs) // 2])
    best["rounds_rps"] = [round(r["rps"], 1) for r in runs]
    if "server_cpu_us_per_request" in runs[0]:
        best["server_cpu_us_per_request"] = statistics.median(r["server_cpu_us_per_request"] for r in runs)
    return best


# ------------------------------------------------------------------------------------------- main
def make_bundle(out: Path) -> None:
    """The digits example deployed with the onnxruntime backend only (what the minimal app serves too)."""
    import qdeploy

    sys.path.insert(0, str(ROOT / "examples"))
    import digits

    data = digits.prepare(out.parent / "serve-data")
    qdeploy.deploy(f"{ROOT / 'examples' / 'digits.py'}:build_model", target="x86-avx512-vnni",
                   spec=ROOT / "examples" / "digits_spec.toml", calib=data / "calib.npz", val=data / "val.npz",
                   output=out, input_shape="1x1x8x8", backends=["onnxruntime"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", default=str(ROOT / "build" / "bench" / "serve-bundle"),
                    help="a bundle whose first artifact is an onnxruntime one (default: made from the digits example)")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--requests", type=int, default=1500)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--output", default=str(ROOT / "build" / "bench" / "serve.json"))
    ap.add_argument("--server", choices=("qdeploy", "minimal"), help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    bundle = Path(args.bundle)
    if args.server:
        run_server(args.server, bundle, args.port)
        return 0
    if not (bundle / "manifest.json").is_file():
        if args.bundle != ap.get_default("bundle"):
            sys.exit(f"{bundle} is not a bundle; make one first (qdeploy deploy ... -o {bundle})")
        make_bundle(bundle)

    from qdeploy.bundle import Bundle
    from qdeploy.serve import FallbackModel
    from qdeploy.serve.http import VERSION  # noqa: F401  (the HTTP layer imports cleanly)

    b = Bundle.load(bundle)
    if b.artifacts[0]["backend"] != "onnxruntime":
        sys.exit(f"{bundle}: the first artifact is {b.artifacts[0]['id']}; the minimal app to compare with runs "
                 f"onnxruntime, so give a bundle deployed with --backend onnxruntime")
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
        mp, mport = servers["minimal"][0].pid, servers["minimal"][1]
        qp, qport = servers["qdeploy"][0].pid, servers["qdeploy"][1]
        runs = [("minimal FastAPI + onnxruntime (JSON)", mport, json_body, jh, mp),
                ("qdeploy serve (JSON)", qport, json_body, jh, qp), ("qdeploy serve (binary)", qport, bin_body, bh, qp)]
        for i in range(args.rounds):  # alternate the order, so a burst of other load hits both sides alike
            for label, port, body, headers, pid in (runs if i % 2 == 0 else runs[::-1]):
                results[label].append(http_load(port, path, body, headers, n, c, pid))
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

    from qdeploy.serve import create_app

    apps = {"minimal": minimal_app(b.path / b.artifacts[0]["path"]),
            "qdeploy": create_app(FallbackModel(b).start())}
    asgi: dict[str, list[float]] = {k: [] for k in apps}
    for i in range(args.rounds):
        for k in (list(apps) if i % 2 == 0 else list(apps)[::-1]):
            asgi[k].append(asgi_cpu_us(apps[k], path, json_body, 1000))
    asgi_us = {k: statistics.median(v) for k, v in asgi.items()}

    table = {k: median_run(v) for k, v in results.items()}
    base, ours = table["minimal FastAPI + onnxruntime (JSON)"], table["qdeploy serve (JSON)"]
    overhead = base["rps"] / ours["rps"] - 1
    print(f"\n{name}: artifact {b.artifacts[0]['id']}, 1 sample per request, concurrency {c}, loopback, "
          f"{os.cpu_count()} CPUs, median of {args.rounds} rounds\n")
    print(f"{'':<40} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'server CPU us/req':>18} {'errors':>7}")
    for k, r in table.items():
        cpu = r.get("server_cpu_us_per_request")
        cpu_text = f"{cpu:.0f}" if cpu is not None else "-"
        print(f"{k:<40} {r['rps']:>9.0f} {r['p50_ms']:>8.3f} {r['p99_ms']:>8.3f} {cpu_text:>18} {r['errors']:>7}")
    cpu_overhead = ours["server_cpu_us_per_request"] / base["server_cpu_us_per_request"] - 1
    # the app-level difference, over the whole per-request cost of the minimal server (uvicorn included)
    app_overhead = (asgi_us["qdeploy"] - asgi_us["minimal"]) / base["server_cpu_us_per_request"]
    print(f"\napp only, through ASGI (no uvicorn, no client), CPU us per request: minimal "
          f"{asgi_us['minimal']:.0f}, qdeploy {asgi_us['qdeploy']:.0f} (median of {args.rounds})")
    for what, value in (("throughput", overhead), ("server CPU time per request", cpu_overhead),
                        ("app CPU difference over the minimal server's CPU per request", app_overhead)):
        verdict = "within" if value <= 0.10 else "OVER"
        print(f"qdeploy serve overhead vs the minimal app ({what}, JSON): {value * 100:+.1f}% ({verdict} the 10% "
              f"budget)")
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"bundle": str(bundle), "artifact": b.artifacts[0]["id"], "concurrency": c,
                               "requests_per_round": n, "rounds": args.rounds, "cpus": os.cpu_count(),
                               "results": table, "overhead_vs_minimal": overhead,
                               "cpu_overhead_vs_minimal": cpu_overhead, "asgi_cpu_us_per_request": asgi_us,
                               "app_overhead_vs_minimal": app_overhead}, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
