"""Ray Serve replicas vs the single-process server, in the same run, with a fault injected into one replica.

    .venv/bin/python benchmarks/bench_ray_serve.py [--bundle BUNDLE] [--replicas 2] [--concurrency 8]
                                                   [--requests 300] [--rounds 3] [--default-proxy]

Servers, all on loopback, all with qdeploy's production defaults (drift guard sampling 5% of requests, metrics on):

* ``qdeploy serve BUNDLE``: one uvicorn process (its own subprocess);
* ``qdeploy serve BUNDLE --replicas N``: a Ray Serve application on a local Ray started by this script, with the fast
  settings the installed Ray supports (``RAY_SERVE_ENABLE_HA_PROXY=1``, ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1``), and
  replica 0's first artifact made to crash after ``--fault-after`` answers (the ``setup`` hook of
  :func:`qdeploy.serve.ray_serve.start_ray_server`): the breaker demotes it to the next link while the load runs;
* with ``--default-proxy``, the same again with Serve's own proxy (the slow Ray defaults), after the first Ray
  is shut down (one Ray at a time).

The load (``--concurrency`` client threads on keep-alive connections, ``--requests`` per round after a warm-up)
alternates between the servers for ``--rounds`` rounds; the median round is reported, and every failed request of
every round (warm-up included) is counted. The client runs on the same machine: on a small one it takes a good
share of the CPU, and other load on the machine moves the numbers. Prints a table and writes
``build/bench/ray_serve.json``. Not a test.
"""

import argparse
import functools
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_serve  # noqa: E402  (the load generator and the single-process server)


def fault_in_rank_0(model, replica: dict, after: int) -> None:
    """Replica 0's first artifact answers ``after`` requests (after its warm-up), then crashes on every call."""
    if replica["rank"] != 0:
        return
    first, original = model.slots[0].id, model.bundle.runner

    def runner(key=0, threads=None):
        r = original(key, threads)
        if key != first:
            return r
        impl, calls = r.infer_impl, [0]

        def flaky(feed):
            calls[0] += 1
            if calls[0] > 1 + after:
                raise RuntimeError(f"injected by the benchmark: {first} crashed in replica {replica['replica']}")
            return impl(feed)

        r.infer_impl = flaky
        return r

    model.bundle.runner = runner


def get_json(port: int, path: str) -> dict:
    import http.client

    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        c.request("GET", path)
        r = c.getresponse()
        return json.loads(r.read())
    finally:
        c.close()


def get_text(port: int, path: str) -> str:
    import http.client

    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        c.request("GET", path)
        return c.getresponse().read().decode()
    finally:
        c.close()


def metric_lines(text: str, *needles: str) -> list[str]:
    return [line for line in text.splitlines() if not line.startswith("#") and all(n in line for n in needles)]


def start_ray(bundle: Path, replicas: int, fast: bool, fault_after: int):
    from qdeploy.serve.ray_serve import start_ray_server

    t = time.perf_counter()
    server = start_ray_server(bundle, replicas=replicas, port=0, fast=fast,
                              setup=functools.partial(fault_in_rank_0, after=fault_after))
    return server, time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", default=str(ROOT / "build" / "bench" / "serve-bundle"),
                    help="a bundle whose first artifact is an onnxruntime one (default: made from the digits example)")
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--requests", type=int, default=300, help="requests per round and server (default 300)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--fault-after", type=int, default=100,
                    help="answers replica 0's first artifact gives before it crashes (default 100)")
    ap.add_argument("--default-proxy", action="store_true",
                    help="also measure Ray Serve with its own proxy (the slow defaults; a second local Ray)")
    ap.add_argument("--output", default=str(ROOT / "build" / "bench" / "ray_serve.json"))
    args = ap.parse_args()
    bundle = Path(args.bundle)
    if not (bundle / "manifest.json").is_file():
        if args.bundle != ap.get_default("bundle"):
            sys.exit(f"{bundle} is not a bundle; make one first (qdeploy deploy ... -o {bundle})")
        bench_serve.make_bundle(bundle)

    from qdeploy.bundle import Bundle
    from qdeploy.serve.ray_serve import describe_settings, fast_settings

    b = Bundle.load(bundle)
    name = bundle.resolve().name
    inp = b.manifest["model"]["inputs"][0]["name"]
    x = b.samples()[f"input:{inp}"][:1]
    body = json.dumps({"inputs": [{"name": inp, "shape": list(x.shape), "datatype": "FP32",
                                   "data": x.ravel().tolist()}]}).encode()
    path, headers = f"/v2/models/{name}/infer", {"Content-Type": "application/json"}
    n, c, rounds = args.requests, args.concurrency, args.rounds
    supported = fast_settings()
    load0 = os.getloadavg()

    single_label = "qdeploy serve (1 process)"
    ray_label = f"qdeploy serve --replicas {args.replicas} (Ray Serve, fast)"
    results: dict[str, list[dict]] = {single_label: [], ray_label: []}
    errors = {single_label: 0, ray_label: 0}
    proc, sport = bench_serve.start_server("qdeploy", bundle)
    ray_server = None
    demotion: dict = {}
    try:
        ray_server, ray_start_s = start_ray(bundle, args.replicas, True, args.fault_after)
        rport = int(ray_server.url.rsplit(":", 1)[1])
        ports = {single_label: sport, ray_label: rport}
        for label, port in ports.items():  # warm-up (its failures count too)
            errors[label] += bench_serve.http_load(port, path, body, headers, 100, c)["errors"]
        for i in range(rounds):  # alternate the order, so a burst of other load hits both alike
            for label in (list(ports) if i % 2 == 0 else list(ports)[::-1]):
                r = bench_serve.http_load(ports[label], path, body, headers, n, c)
                results[label].append(r)
                errors[label] += r["errors"]
        time.sleep(2.5)  # every replica pushed its status to the hub (each second) since the load ended
        meta = get_json(rport, f"/v2/models/{name}")
        text = get_text(rport, "/metrics")
        bad = [r for r in meta["replicas"] if r["demotions"]]
        demotion = {"settings": meta["replica"], "replicas": meta["replicas"],
                    "metrics": (metric_lines(text, "qdeploy_demotions_total")
                                + metric_lines(text, "qdeploy_active_artifact", "} 1.0")),
                    "demoted_replicas": [{"replica": r["replica"], "rank": r["rank"], "active": r["active_artifact"],
                                          "demotions": r["demotions"]} for r in bad]}
        own = None
        for _ in range(40):  # the demoted replica's own answer (the balancer picks who answers)
            m = get_json(rport, f"/v2/models/{name}")
            if bad and m["replica"]["id"] == bad[0]["replica"]:
                own = m
                break
        demotion["own_metadata"] = None if own is None else {
            "replica": own["replica"], "active_artifact": own["active_artifact"],
            "events": own["events"]}
    finally:
        proc.terminate()
        proc.wait(10)
        if ray_server is not None:
            ray_server.stop()

    default_proxy = None
    if args.default_proxy:
        label = f"qdeploy serve --replicas {args.replicas} (Ray Serve, default proxy)"
        server, _ = start_ray(bundle, args.replicas, False, 10 ** 9)
        try:
            port = int(server.url.rsplit(":", 1)[1])
            errs = bench_serve.http_load(port, path, body, headers, 100, c)["errors"]
            runs = [bench_serve.http_load(port, path, body, headers, n, c) for _ in range(rounds)]
            errs += sum(r["errors"] for r in runs)
            default_proxy = label
            results[label], errors[label] = runs, errs
        finally:
            server.stop()

    table = {k: bench_serve.median_run(v) for k, v in results.items()}
    for k in table:
        table[k]["errors_all_rounds"] = errors[k]
    load1 = os.getloadavg()
    ratio = table[ray_label]["rps"] / table[single_label]["rps"]
    settings = describe_settings({k: v for k, v in supported.items()})
    print(f"\n{name}: artifact {b.artifacts[0]['id']}, 1 sample per request, concurrency {c}, loopback, "
          f"{os.cpu_count()} CPUs (load average {load0[0]:.1f} -> {load1[0]:.1f}), median of {rounds} rounds of {n}")
    print(f"Ray {ray_settings_version()}: fast settings supported and used: {settings}; Ray Serve started in "
          f"{ray_start_s:.0f} s\n")
    print(f"{'':<52} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'failed (all rounds)':>20}")
    for k, r in table.items():
        print(f"{k:<52} {r['rps']:>8.0f} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} {r['errors_all_rounds']:>20}")
    print(f"\nRay Serve ({args.replicas} replicas) / single process: {ratio:.2f}x throughput")
    for d in demotion.get("demoted_replicas", []):
        print(f"fault: replica {d['replica']} (rank {d['rank']}) demoted "
              + ", ".join(f"{x['artifact']} ({x['reason']} x{x['count']})" for x in d["demotions"])
              + f"; now serving {d['active']}")
    if not demotion.get("demoted_replicas"):
        print("fault: no replica was demoted (replica 0 took fewer than --fault-after requests)")
    print("metrics: " + "\n         ".join(demotion.get("metrics", [])))
    own = demotion.get("own_metadata")
    print("the demoted replica's own metadata: " + ("not reached" if own is None else
          f"active {own['active_artifact']}, events {[e['code'] + ' ' + e['artifact'] for e in own['events']]}"))
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"bundle": str(bundle), "artifact": b.artifacts[0]["id"], "concurrency": c,
                               "requests_per_round": n, "rounds": rounds, "replicas": args.replicas,
                               "cpus": os.cpu_count(), "loadavg_before_after": [load0[0], load1[0]],
                               "ray_version": ray_settings_version(), "fast_settings": supported,
                               "ray_start_s": ray_start_s, "fault_after": args.fault_after, "results": table,
                               "ray_over_single": ratio, "default_proxy": default_proxy, "fault": demotion},
                              indent=2) + "\n")
    print(f"wrote {out}")
    failed = sum(errors.values())
    return 1 if failed or not demotion.get("demoted_replicas") else 0


def ray_settings_version() -> str:
    import ray

    return str(ray.__version__)


if __name__ == "__main__":
    sys.exit(main())
