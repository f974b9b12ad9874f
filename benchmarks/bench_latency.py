"""Are the manifest's latency ratios honest on a busy machine? Deploy the digits example to this host with every
CPU backend while a second process keeps one core busy, then measure each artifact against the FP32 reference
again from this separate script (pairwise alternation, its own loop, same batch and threads) and compare.

Prints a table and writes build/bench/latency.json. Target (issue: numbers a user can trust): every INT8
artifact's manifest ratio within +-25% of the independent one.

    python benchmarks/bench_latency.py [--no-load]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def _spin(stop) -> None:  # the other job on the shared machine: one core at 100%
    while not stop.is_set():
        sum(range(10_000))


def independent_ratio(ref, art, feed: dict, pairs: int = 200) -> tuple[float, float, float]:
    """``(ratio, ref ms, artifact ms)``: ``pairs`` alternations reference/artifact, medians of each."""
    for r in (ref, art):
        r.infer(feed)
        r.infer(feed)
    t_ref, t_art = [], []
    for i in range(pairs):
        order = (ref, art) if i % 2 == 0 else (art, ref)  # alternate who goes first
        for r in order:
            t0 = time.perf_counter_ns()
            r.infer(feed)
            (t_ref if r is ref else t_art).append(time.perf_counter_ns() - t0)
    ref_ms, art_ms = np.median(t_ref) / 1e6, np.median(t_art) / 1e6
    return float(ref_ms / art_ms), float(ref_ms), float(art_ms)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--no-load", action="store_true", help="do not keep a core busy")
    ap.add_argument("--pairs", type=int, default=200)
    args = ap.parse_args()
    stop = mp.Event()
    spinner = None if args.no_load else mp.Process(target=_spin, args=(stop,), daemon=True)
    if spinner:
        spinner.start()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            data = Path(tmp) / "digits"
            subprocess.run([sys.executable, str(ROOT / "examples" / "digits.py"), "prepare", str(data)], check=True,
                           capture_output=True)
            bundle = Path(tmp) / "demo"
            subprocess.run([str(Path(sys.executable).parent / "qdeploy"), "deploy",
                            f"{ROOT}/examples/digits.py:build_model", "--input-shape", "1x1x8x8", "--target",
                            "detect", "--spec", str(ROOT / "examples" / "digits_spec.toml"), "--calib",
                            str(data / "calib.npz"), "--val", str(data / "val.npz"), "-o", str(bundle)],
                           check=True, capture_output=True)
            from qdeploy.bundle import Bundle

            b = Bundle.load(bundle)
            m = b.manifest
            batch = m["latency_measured_on"]["batch"]
            x = b.samples()
            with np.load(data / "val.npz") as v:
                feed = {"input": v["input"][:batch]}
            rows = []
            ref = b.reference_runner()
            for art in b.artifacts:
                if art["latency_vs_fp32"] is None:
                    continue
                runner = b.runner(art["id"])
                ratio, ref_ms, art_ms = independent_ratio(ref, runner, feed, args.pairs)
                runner.close()
                rows.append({"artifact": art["id"], "manifest_vs_fp32": art["latency_vs_fp32"],
                             "independent_vs_fp32": ratio, "independent_ref_ms": ref_ms,
                             "independent_art_ms": art_ms, "manifest_ms": art["latency_ms"],
                             "deviation": art["latency_vs_fp32"] / ratio - 1})
            ref.close()
            del x
    finally:
        stop.set()
        if spinner:
            spinner.join(5)
    print(f"\nthreads {m['latency_measured_on']['threads']}, batch {batch}, "
          f"{'one core kept busy by another process' if not args.no_load else 'no extra load'}\n")
    print(f"{'artifact':<24} {'manifest':>9} {'independent':>12} {'deviation':>10}")
    for r in rows:
        print(f"{r['artifact']:<24} {r['manifest_vs_fp32']:>8.2f}x {r['independent_vs_fp32']:>11.2f}x "
              f"{r['deviation'] * 100:>+9.1f}%")
    ok = all(abs(r["deviation"]) <= 0.25 for r in rows)
    print(f"\nall within +-25%: {ok}")
    out = ROOT / "build" / "bench" / "latency.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"load": not args.no_load, "threads": m["latency_measured_on"]["threads"],
                               "batch": batch, "rows": rows, "within_25pct": ok,
                               "measured_on": m["latency_measured_on"]["cpu"]}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
