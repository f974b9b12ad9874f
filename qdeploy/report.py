"""Summary tables and ``report.md``, from a manifest (the single source of the numbers)."""
from __future__ import annotations

from typing import Any

HEADERS = ("artifact", "backend", "precision", "size", "vs fp32", "latency", "vs fp32", "verified", "budget")


def _fmt_size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _speed(ref_ms: float, ms: float | None) -> str:
    if not ms:
        return "n/a"
    return f"{ref_ms / ms:.2f}x faster" if ms <= ref_ms else f"{ms / ref_ms:.2f}x slower"


def summary_rows(manifest: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    metric_names: list[str] = []
    for art in manifest["artifacts"]:
        for k in art["metrics"]:
            if k not in metric_names:
                metric_names.append(k)
    ref = manifest["reference"]
    headers = list(HEADERS[:-1]) + metric_names + ["budget"]
    rows = [["reference", "onnxruntime", "fp32", _fmt_size(ref["size_bytes"]), "1.00x",
             f"{ref['latency_ms']:.2f} ms", "1.00x", "runtime"]
            + [f"{ref['metrics'][m]:.4f}" if m in ref.get("metrics", {}) else "" for m in metric_names] + [""]]
    for art in manifest["artifacts"]:
        b = art["budget"]
        lat = art.get("latency_ms")
        rows.append([art["id"], art["target"], art["precision"], _fmt_size(art["size_bytes"]),
                     f"{art['size_vs_fp32']:.2f}x", f"{lat:.2f} ms" if lat is not None else "n/a (simulated)" if art["verified_on"] == "simulated" else "n/a",
                     _speed(ref["latency_ms"], lat), art["verified_on"]]
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
    lines = [f"# qdeploy report: {manifest['model']['source']}", "",
             f"- target profile: `{prof['name']}` (sha256 {prof['sha256'][:12]})",
             f"- model sha256: `{manifest['model']['sha256'][:16]}`, {len(manifest['model']['layers'])} quantizable "
             f"layers", f"- validation: {manifest['validation']['samples']} samples from "
             f"{manifest['validation']['source']}", f"- calibration: {manifest['calibration']['samples']} samples, "
             f"{manifest['calibration']['method']}", "",
             f"Latency: median of one batch of {manifest.get('latency_measured_on', {}).get('batch', 32)} on "
             f"`{manifest.get('latency_measured_on', {}).get('cpu') or 'this host'}` in each artifact's own runtime "
             "(the FP32 reference in onnxruntime on the CPU). `verified` says where the "
             "accuracy numbers come from: `runtime` (the real runtime here), `gpu`, or `simulated` (an equivalent "
             "graph run in onnxruntime, not the target runtime).", "", markdown_table(headers, rows), "",
             "## Events", ""]
    lines += [f"- `{e['code']}` {e['target']}: {e['message']}" for e in manifest["events"]] or ["- none"]
    for art in manifest["artifacts"]:
        lines += ["", f"## {art['id']}", "", f"- path: `{art['path']}`, trials: {art['trials']}",
                  "", "| layer | precision |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in art["layer_precisions"].items()]
        if art.get("sensitivity"):
            lines += ["", "Per-layer sensitivity (SQNR in dB of the output with only that layer quantized; lower "
                      "loses more):", "", "| layer | sqnr_db |", "|---|---|"]
            lines += [f"| {k} | {v:.1f} |" for k, v in sorted(art["sensitivity"].items(), key=lambda kv: kv[1])]
    return "\n".join(lines) + "\n"
