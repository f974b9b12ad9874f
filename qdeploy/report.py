"""Summary tables and ``report.md``, from a manifest (the single source of the numbers)."""
from __future__ import annotations

from typing import Any

HEADERS = ("artifact", "backend", "precision", "size", "size vs fp32", "latency", "speed vs fp32", "verified", "budget")


def _fmt_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _speed(ratio: float | None) -> str:
    """A side-by-side ``FP32 time / artifact time`` ratio in words."""
    if not ratio:
        return "n/a"
    return f"{ratio:.2f}x faster" if ratio >= 1 else f"{1 / ratio:.2f}x slower"


def _latency(lat: dict[str, Any] | None, ms: float | None) -> str:
    if ms is None:
        return ""
    if lat and lat.get("p25_ms") is not None:
        return f"{ms:.2f} ms (IQR {lat['p25_ms']:.2f}-{lat['p75_ms']:.2f})"
    return f"{ms:.2f} ms"


def summary_rows(manifest: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    metric_names: list[str] = []
    for art in manifest["artifacts"]:
        for k in art["metrics"]:
            if k not in metric_names:
                metric_names.append(k)
    ref = manifest["reference"]
    headers = list(HEADERS[:-1]) + metric_names + ["budget"]
    rows = [["reference", "onnxruntime", "fp32", _fmt_size(ref["size_bytes"]), "1.00x",
             _latency(manifest.get("latency_measured_on", {}).get("reference"), ref["latency_ms"]), "1.00x",
             "runtime"]
            + [f"{ref['metrics'][m]:.4f}" if m in ref.get("metrics", {}) else "" for m in metric_names] + [""]]
    for art in manifest["artifacts"]:
        b = art["budget"]
        lat = art.get("latency_ms")
        rows.append([art["id"], art["target"], art["precision"], _fmt_size(art["size_bytes"]),
                     f"{art['size_vs_fp32']:.2f}x",
                     _latency(art.get("latency"), lat) if lat is not None
                     else "n/a (simulated)" if art["verified_on"] == "simulated" else "n/a",
                     _speed(art.get("latency_vs_fp32")), art["verified_on"]]
                    + [f"{art['metrics'][m]:.4f}" if m in art["metrics"] else "" for m in metric_names]
                    + [("pass" if b["passed"] else "FAIL") + f" ({b['metric']} {b['value']:.4f} vs {b['budget']:.4f})"])
    return headers, rows


def text_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [headers] + rows) for i in range(len(headers))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def events_text(events: list[dict[str, Any]]) -> list[str]:
    return [f"[{e['code']}] {e['target']}: {e['message']}" for e in events]


def markdown_report(manifest: dict[str, Any]) -> str:
    headers, rows = summary_rows(manifest)
    prof = manifest["profile"]
    timing = manifest.get("latency_measured_on", {})
    lines = [f"# qdeploy report: {manifest['model']['source']}", "",
             f"- target profile: `{prof['name']}` (sha256 {prof['sha256'][:12]})",
             f"- model sha256: `{manifest['model']['sha256'][:16]}`, {len(manifest['model']['layers'])} quantizable "
             f"layers", f"- validation: {manifest['validation']['samples']} samples from "
             f"{manifest['validation']['source']}", f"- calibration: {manifest['calibration']['samples']} samples, "
             f"{manifest['calibration']['method']}", "",
             f"Latency: one batch of {timing.get('batch', 32)} on `{timing.get('cpu') or 'this host'}`, "
             f"{timing.get('threads', '?')} intra-op thread(s), every artifact in its own runtime and the FP32 "
             f"reference in onnxruntime timed side by side, round-robin ({timing.get('rounds', '?')} rounds): "
             "median and interquartile range; `vs fp32` is the median of the per-round ratios. `verified` says "
             "where the "
             "accuracy numbers come from: `runtime` (the real runtime here), `gpu`, or `simulated` (an equivalent "
             "graph run in onnxruntime, not the target runtime).", "", markdown_table(headers, rows), "",
             "## Events", ""]
    lines += [f"- `{e['code']}` {e['target']}: {e['message']}" for e in manifest["events"]] or ["- none"]
    lines += ["", "## Serving order", ""]
    lines += [f"{i + 1}. `{a['id']}`: {a.get('chain_reason', 'profile order')}"
              for i, a in enumerate(manifest["artifacts"])]
    for art in manifest["artifacts"]:
        lines += ["", f"## {art['id']}", "", f"- path: `{art['path']}`, trials: {art['trials']}"]
        precs = list(art["layer_precisions"].values())
        common = max(set(precs), key=precs.count) if precs else None
        odd = {k: v for k, v in art["layer_precisions"].items() if v != common}
        if common:
            lines += [f"- {len(precs) - len(odd)} of {len(precs)} layers in {common}"
                      + ("; the others:" if odd else "")]
        if odd:
            lines += ["", "| layer | precision |", "|---|---|"] + [f"| {k} | {v} |" for k, v in odd.items()]
        front = art.get("front") or {}
        if len(front.get("points", [])) > 1:
            lines += ["", f"Verified configurations (objective `{front.get('objective')}`; the kept one is marked):",
                      "", "| trial | metric | budget | vs fp32 (speed) | size | promoted layers |", "|---|---|---|---|---|---|"]
            for p in front["points"]:
                mark = " **kept**" if p["trial"] == front.get("chosen") else ""
                speed = f"{p['latency_vs_fp32']:.2f}x" if p.get("latency_vs_fp32") else "n/a"
                lines.append(f"| {p['trial']}{mark} | {p['metric']} {p['value']:.4f} | "
                             f"{'pass' if p['passed'] else 'below'} | {speed} | {_fmt_size(p['size_bytes'])} | "
                             f"{len(p['promoted'])} |")
        if art.get("sensitivity"):
            lines += ["", "Per-layer sensitivity (SQNR in dB of the output with only that layer quantized; lower "
                      "loses more):", "", "| layer | sqnr_db |", "|---|---|"]
            lines += [f"| {k} | {v:.1f} |" for k, v in sorted(art["sensitivity"].items(), key=lambda kv: kv[1])]
    return "\n".join(lines) + "\n"
