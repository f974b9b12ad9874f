"""``report.html``: one self-contained page per bundle (inline SVG plots, no network), from the manifest alone.

The verdict comes first (which artifact serves, which is fastest, which failed and why), then the plots:
per-layer sensitivity, the precision map of every artifact, the accuracy-latency-size front of every entry with
the kept point marked, the budget metric across the fallback's verifications, and the distribution of the
per-sample error of each artifact. matplotlib is imported here only, when a report is written.
"""
from __future__ import annotations

import html
import io
from typing import Any

from .report import summary_rows

PRECISION_COLORS = {"int4": "#6a3d9a", "int8": "#1f78b4", "fp8": "#a6cee3", "fp16": "#33a02c", "bf16": "#b2df8a",
                    "fp32": "#e31a1c"}


def _svg(fig: Any) -> str:
    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight",
                metadata={"Creator": None, "Date": None, "Format": None, "Type": None})
    import matplotlib.pyplot as plt

    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg"):]  # drop the XML prolog: inline in HTML


def _plots(m: dict[str, Any]) -> list[tuple[str, str, str]]:
    """``(title, caption, svg)`` for each plot the manifest has data for."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 9, "svg.fonttype": "none"})
    arts = m["artifacts"]
    out: list[tuple[str, str, str]] = []

    sens_art = next((a for a in arts if a.get("sensitivity")), None)
    if sens_art:
        sens = sorted(sens_art["sensitivity"].items(), key=lambda kv: kv[1])[:40]
        fig, ax = plt.subplots(figsize=(8, max(2.0, 0.18 * len(sens) + 0.8)))
        names = [k for k, _ in sens][::-1]
        vals = [v for _, v in sens][::-1]
        ax.barh(names, vals, color="#1f78b4")
        ax.set_xlabel("output SQNR (dB) with only this layer quantized (lower: more sensitive)")
        ax.tick_params(axis="y", labelsize=7)
        out.append(("Per-layer sensitivity", f"{sens_art['id']}: the {len(sens)} most sensitive layers, simulated "
                    "on the samples quantization hurts most", _svg(fig)))

    layers = list(m["model"]["layers"])
    if arts and layers:
        fig, ax = plt.subplots(figsize=(8, 0.45 * len(arts) + 1.2))
        for row, a in enumerate(arts):
            for col, name in enumerate(layers):
                p = a["layer_precisions"].get(name, a["precision"])
                ax.add_patch(matplotlib.patches.Rectangle((col, row), 1, 0.9,
                                                          color=PRECISION_COLORS.get(p, "#999999")))
        ax.set_xlim(0, len(layers))
        ax.set_ylim(0, len(arts))
        ax.set_yticks([i + 0.45 for i in range(len(arts))], [a["id"] for a in arts])
        ax.set_xticks([])
        ax.set_xlabel(f"{len(layers)} layers, in graph order")
        used = sorted({p for a in arts for p in a["layer_precisions"].values()} or {"fp32"})
        ax.legend(handles=[matplotlib.patches.Patch(color=PRECISION_COLORS.get(p, "#999"), label=p) for p in used],
                  loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=len(used), frameon=False)
        ax.invert_yaxis()
        out.append(("Precision map", "each artifact's precision per layer", _svg(fig)))

    fronts = [(a, a["front"]) for a in arts if len((a.get("front") or {}).get("points", [])) > 1]
    if fronts:
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
        for a, front in fronts:
            pts = front["points"]
            kept = pts[front["chosen"]]
            xs = [p["latency_vs_fp32"] or 0 for p in pts]
            ys = [p["value"] for p in pts]
            sc = axes[0].scatter(xs, ys, s=[20 + 60 * (p["size_bytes"] / max(q["size_bytes"] for q in pts)) for p in pts],
                                 alpha=0.6, label=a["id"])
            axes[0].scatter([kept["latency_vs_fp32"] or 0], [kept["value"]], s=160, facecolors="none",
                            edgecolors=sc.get_facecolor()[0], linewidths=2)
            axes[1].plot(range(len(pts)), ys, marker="o", label=a["id"])
        b = arts[0]["budget"]
        for ax in axes:
            ax.axhline(b["budget"], color="#e31a1c", linestyle="--", linewidth=1)
            ax.set_ylabel(b["metric"])
        axes[0].set_xlabel("speed vs FP32 (x, short side-by-side timing per trial); circled: kept")
        axes[1].set_xlabel("verification")
        axes[1].legend(fontsize=7)
        out.append(("Accuracy, latency and size of every verified configuration",
                    "left: the front (marker area: size), the kept point circled, the budget dashed; right: the "
                    "budget metric across the fallback's verifications", _svg(fig)))

    errs = [(a["id"], a["error_per_sample"]) for a in arts if a.get("error_per_sample")]
    if errs:
        fig, ax = plt.subplots(figsize=(8, 2.8))
        for ident, e in errs:
            edges, counts = e["edges"], e["counts"]
            ax.stairs(counts, edges, label=ident)
        ax.set_xscale("symlog", linthresh=1e-3)
        ax.set_xlabel(f"per-sample relative error ||artifact - FP32|| / ||FP32|| on {m['budget_output']!r}")
        ax.set_ylabel("samples")
        ax.legend(fontsize=7)
        out.append(("Error distribution", "per validation sample, each artifact", _svg(fig)))
    return out


def _verdict(m: dict[str, Any]) -> list[str]:
    arts = m["artifacts"]
    serving = next((a for a in arts if a["budget"]["passed"] and a["verified_on"] != "simulated"), None)
    timed = [a for a in arts if a.get("latency_vs_fp32")]
    fastest = max(timed, key=lambda a: a["latency_vs_fp32"]) if timed else None
    lines = []
    if serving:
        lines.append(f"<b>Serves:</b> <code>{html.escape(serving['id'])}</code> "
                     f"({html.escape(serving.get('chain_reason', 'first in the chain'))}).")
    else:
        lines.append("<b>Serves:</b> no artifact that met its budget runs here; a server falls back along the "
                     "chain to the FP32 reference.")
    if fastest:
        lines.append(f"<b>Fastest:</b> <code>{html.escape(fastest['id'])}</code>, "
                     f"{fastest['latency_vs_fp32']:.2f}x FP32 (side by side, "
                     f"{m.get('latency_measured_on', {}).get('threads', '?')} thread(s)).")
    for a in arts:
        b = a["budget"]
        if not b["passed"]:
            lines.append(f"<b>Failed:</b> <code>{html.escape(a['id'])}</code>: {b['metric']} {b['value']:.4f}, "
                         f"budget {b['budget']:.4f}.")
        if a["verified_on"] == "simulated":
            lines.append(f"<b>Simulated:</b> <code>{html.escape(a['id'])}</code> was verified by simulation (its "
                         "runtime is not on this host); it never serves here.")
    refused = sorted({e["target"] for e in m["events"] if e["code"] in ("BACKEND_UNAVAILABLE",
                                                                           "MODEL_FORMAT_UNSUPPORTED",
                                                                           "OP_UNSUPPORTED", "BUILD_FAILED")})
    if refused:
        lines.append(f"<b>Not built or not run here:</b> {', '.join(html.escape(t) for t in refused)} (events below).")
    return lines


def html_report(m: dict[str, Any]) -> str:
    headers, rows = summary_rows(m)
    table = ("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in headers) + "</tr>"
             + "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
             + "</table>")
    try:
        plots = _plots(m)
        plot_html = "".join(f"<h2>{html.escape(t)}</h2><p class=cap>{html.escape(c)}</p><div class=plot>{svg}</div>"
                            for t, c, svg in plots)
    except ImportError:
        plot_html = "<p>(plots need matplotlib: <code>pip install matplotlib</code>)</p>"
    events = "".join(f"<li><code>{html.escape(e['code'])}</code> {html.escape(e['target'])}: "
                     f"{html.escape(e['message'])}</li>" for e in m["events"]) or "<li>none</li>"
    timing = m.get("latency_measured_on", {})
    return f"""<!doctype html>
<html lang=en><head><meta charset=utf-8><title>qdeploy report: {html.escape(m['model']['source'])}</title>
<style>
body {{ font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; padding: 0 1em }}
table {{ border-collapse: collapse; font-size: 12px; margin: 1em 0 }}
td, th {{ border: 1px solid #ccc; padding: 3px 6px; text-align: left }} th {{ background: #f3f3f3 }}
.verdict {{ background: #f5f9ff; border-left: 4px solid #1f78b4; padding: .6em 1em }}
.verdict p {{ margin: .25em 0 }} .cap {{ color: #555; margin-top: -.5em }} .plot svg {{ max-width: 100%; height: auto }}
code {{ background: #f3f3f3; padding: 0 3px }}
</style></head><body>
<h1>qdeploy report</h1>
<p><code>{html.escape(m['model']['source'])}</code> &rarr; profile <code>{html.escape(m['profile']['name'])}</code>,
{len(m['model']['layers'])} quantizable layers, {m['validation']['samples']} validation samples
({html.escape(str(m['validation']['source']))}), qdeploy {html.escape(m['qdeploy_version'])}, {html.escape(m['created'])}</p>
<div class=verdict>{''.join(f'<p>{line}</p>' for line in _verdict(m))}</div>
<h2>Artifacts</h2>
<p class=cap>Latency: one batch of {timing.get('batch', '?')} on {html.escape(str(timing.get('cpu') or 'this host'))},
{timing.get('threads', '?')} intra-op thread(s), every artifact and the FP32 reference timed side by side,
round-robin. <code>verified</code>: <code>runtime</code> (the real runtime here), <code>gpu</code>, or
<code>simulated</code>.</p>
{table}
{plot_html}
<h2>Events</h2><ul>{events}</ul>
</body></html>
"""
