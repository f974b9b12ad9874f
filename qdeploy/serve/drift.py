"""The drift guard: shadow-run a sample of live requests through the FP32 reference, off the request path.

Each artifact gets a :class:`DriftRule` from the budget its manifest entry recorded. Live requests carry no
labels, so the rule is label-free:

- ``cosine``, ``sqnr_db``, ``max_abs``, ``mean_abs`` budgets: the same metric, computed on the window of
  shadowed samples against the reference, must stay within the budget's bound (or within the artifact's own
  verified value, when that was already worse and the bundle kept it).
- ``top1_agreement`` and ``top1_accuracy`` budgets: the rate of top-1 disagreement with the reference. The
  allowed rate is what verification measured plus the budget's slack (for ``top1_accuracy``: the reference
  accuracy minus the bound, the most accuracy a disagreement may cost). A window of a few dozen samples is
  noisy, so the guard demotes only when the rate's one-sided 99% lower confidence bound (Wilson) exceeds the
  allowed rate: one unlucky disagreement does not demote, a real shift does.

Sampling is deterministic (every 1/rate-th request); the queue is bounded and a full queue drops the shadow
sample (counted), never delays the request.
"""
from __future__ import annotations

import itertools
import logging
import math
import queue
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..spec import HIGHER_IS_BETTER

log = logging.getLogger("qdeploy.serve")

Z_99 = 2.326
QUEUE_SIZE = 64
CONTINUOUS = {m: higher for m, higher in HIGHER_IS_BETTER.items() if not m.startswith("top1")}  # label-free metrics


@dataclass(frozen=True)
class DriftRule:
    """How one artifact's live outputs are judged against the reference on ``output``."""

    output: str
    metric: str  # a continuous metric, or "top1_disagreement"
    bound: float  # the largest allowed disagreement rate, or the metric's bound
    higher_is_better: bool
    basis: str  # where the bound comes from, in words

    def describe(self) -> dict[str, Any]:
        return {"output": self.output, "metric": self.metric, "bound": self.bound, "basis": self.basis}

    def judge(self, ref: np.ndarray, out: np.ndarray) -> tuple[bool, dict[str, Any], str]:
        """(drifted, numbers, sentence) for one window of reference and artifact outputs."""
        n = len(ref)
        if self.metric == "top1_disagreement":
            k = int(np.sum(ref.reshape(n, -1).argmax(1) != out.reshape(n, -1).argmax(1)))
            rate, lower = k / n, wilson_lower(k, n)
            drifted = lower > self.bound
            text = (f"top-1 disagreement with the FP32 reference on {n} live samples = {rate:.3f} (99% lower "
                    f"bound {lower:.3f}) exceeds the allowed {self.bound:.4f} ({self.basis})")
            return drifted, {"samples": n, "value": rate, "lower_bound": lower, "bound": self.bound}, text
        from ..verify import output_metrics

        value = output_metrics(ref, out)[self.metric]
        drifted = value < self.bound if self.higher_is_better else value > self.bound
        op = "below" if self.higher_is_better else "above"
        text = (f"{self.metric} against the FP32 reference on {n} live samples = {value:.4f}, {op} the bound "
                f"{self.bound:.4f} ({self.basis})")
        return drifted, {"samples": n, "value": value, "bound": self.bound}, text


def wilson_lower(k: int, n: int, z: float = Z_99) -> float:
    """One-sided lower confidence bound of a proportion ``k/n`` (Wilson score interval)."""
    if n == 0:
        return 0.0
    p = k / n
    centre = p + z * z / (2 * n)
    spread = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, (centre - spread) / (1 + z * z / n))


def drift_rule(art: Mapping[str, Any], manifest: Mapping[str, Any]) -> DriftRule | None:
    """The rule for one manifest artifact, or None when its budget metric cannot be judged without labels."""
    budget = art.get("budget") or {}
    metric = budget.get("metric")
    output = budget.get("output") or manifest.get("budget_output")
    if not metric or not output or "budget" not in budget:
        return None
    bound = float(budget["budget"])
    verified = (art.get("metrics_per_output") or {}).get(output) or art.get("metrics") or {}
    if metric in CONTINUOUS:
        higher = CONTINUOUS[metric]
        v = verified.get(metric)
        basis = f"the budget's bound on {metric}"
        if v is not None and (v < bound if higher else v > bound):
            bound, basis = float(v), f"the artifact's verified {metric}, already outside the budget"
        return DriftRule(output, metric, bound, higher, basis)
    agreement = float(verified.get("top1_agreement", 1.0))
    if metric == "top1_agreement":
        allowed = 1.0 - min(bound, agreement)
        return DriftRule(output, "top1_disagreement", allowed, False, "1 - the top1_agreement budget")
    if metric == "top1_accuracy":
        ref_acc = (manifest.get("reference", {}).get("metrics") or {}).get("top1_accuracy")
        slack = max(0.0, float(ref_acc) - bound) if ref_acc is not None else 0.0
        allowed = (1.0 - agreement) + slack
        return DriftRule(output, "top1_disagreement", allowed, False,
                         f"verified disagreement {1.0 - agreement:.4f} + top1_accuracy budget slack {slack:.4f}")
    log.warning("artifact %s: budget metric %r needs labels or a plugin; its drift guard is off", art.get("id"),
                metric)
    return None


class DriftGuard:
    """A background thread that compares shadowed live samples with the FP32 reference, per artifact."""

    def __init__(self, reference: str | Path, rate: float, window: int,
                 on_drift: Callable[[Any, str], None]) -> None:
        from ..backend import OrtRunner

        self.rate, self.window, self.on_drift = rate, window, on_drift
        self._ref = OrtRunner(reference, threads=1)  # one thread: stay out of the request path's way
        self._q: queue.Queue = queue.Queue(maxsize=QUEUE_SIZE)
        self._counter = itertools.count()
        self._windows: dict[str, tuple[list[np.ndarray], list[np.ndarray], int]] = {}
        self.shadowed = self.dropped = self.checks = self.failures = 0
        self._thread = threading.Thread(target=self._run, name="qdeploy-drift", daemon=True)
        self._thread.start()

    def offer(self, slot: Any, feed: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray]) -> None:
        """Called on the request path: picks every 1/rate-th request and queues it without waiting."""
        n = next(self._counter)
        if math.floor((n + 1) * self.rate) == math.floor(n * self.rate):
            return
        try:
            self._q.put_nowait((slot, feed, outputs[slot.drift.output]))
        except queue.Full:
            self.dropped += 1

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            slot, feed, out = item
            if slot.state != "ready":
                continue
            try:
                ref = self._ref.infer(feed)[slot.drift.output]
                self.shadowed += 1
                refs, outs, rows = self._windows.get(slot.id, ([], [], 0))
                refs.append(ref)
                outs.append(np.asarray(out))
                rows += len(ref)
                if rows < self.window:
                    self._windows[slot.id] = (refs, outs, rows)
                    continue
                self._windows.pop(slot.id, None)
                drifted, numbers, text = slot.drift.judge(np.concatenate(refs), np.concatenate(outs))
                self.checks += 1
                slot.last_drift = {**numbers, "drifted": drifted}
                if drifted:
                    self.on_drift(slot, text)
            except Exception:  # the guard must never take the server down
                self.failures += 1
                log.exception("drift guard: shadow run failed")

    def describe(self) -> dict[str, Any]:
        return {"enabled": True, "sample": self.rate, "window": self.window, "shadowed": self.shadowed,
                "dropped": self.dropped, "checks": self.checks, "failures": self.failures}

    def close(self) -> None:
        try:
            self._q.put_nowait(None)
        except queue.Full:
            try:
                self._q.get_nowait()
                self._q.put_nowait(None)
            except (queue.Empty, queue.Full):
                pass
        self._thread.join(timeout=2)
        self._ref.close()
