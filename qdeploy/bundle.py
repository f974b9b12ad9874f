"""Deployment bundles: a folder with ``manifest.json``, the FP32 reference, the artifacts, warm-up samples
and ``report.md``/``report.html``. Written into a temporary folder beside the destination and renamed into place; loading
checks the schema version and the sha256 of every file, and refuses a tampered or unknown bundle.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from .errors import BundleError, IntegrityError
from .model import sha256_file
from .records import SCHEMA_VERSION, ArtifactRecord, Manifest
MANIFEST = "manifest.json"
SAMPLES = "samples.npz"


def path_sha256(path: Path) -> str:
    """sha256 of a file, or of a folder (over its files' relative paths and contents, in sorted order)."""
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(f.relative_to(path).as_posix().encode() + b"\0" + sha256_file(f).encode())
    return h.hexdigest()


def path_size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def prepare_output(output: Path) -> Path:
    """Check ``output`` can receive a bundle and return a fresh staging folder beside it."""
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise BundleError(f"output {output} exists and is a file; choose another -o folder")
    if output.is_dir() and any(output.iterdir()) and not (output / MANIFEST).is_file():
        raise BundleError(f"output folder {output} is not empty and is not a qdeploy bundle; choose another -o "
                          f"folder or empty it")
    return staging_beside(output, "a bundle")


def staging_beside(output: Path, what: str) -> Path:
    """A fresh staging folder beside ``output`` (renamed into place once complete), readable by other users."""
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.staging-", dir=output.parent))
    except OSError as exc:
        raise BundleError(f"cannot write {what} at {output}: {exc.strerror or exc} ({exc.filename or output.parent}); "
                          f"choose a writable -o folder") from None
    staging.chmod(0o755)  # mkdtemp makes it private; bundles and repositories are read by servers and other users
    return staging


def commit(staging: Path, output: Path) -> None:
    """Atomically (as far as the filesystem allows) replace ``output`` with ``staging``."""
    old = None
    if output.exists():
        old = output.with_name(f".{output.name}.old-{os.getpid()}")
        output.rename(old)
    staging.rename(output)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write_manifest(folder: Path, manifest: Manifest) -> Manifest:
    """Fill the ``files`` integrity map (every file but the manifest) and write ``manifest.json`` atomically."""
    manifest.schema_version = SCHEMA_VERSION
    manifest.files = {f.relative_to(folder).as_posix(): sha256_file(f)
                      for f in sorted(folder.rglob("*")) if f.is_file() and f.name != MANIFEST
                      and not f.name.startswith(f".{MANIFEST}.tmp")}
    tmp = folder / f".{MANIFEST}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(manifest.to_json(), indent=2, default=_json_default) + "\n")
    os.replace(tmp, folder / MANIFEST)
    return manifest


def write_manifest(folder: Path, manifest: dict[str, Any] | Manifest) -> dict[str, Any]:
    """Rewrite ``folder``'s ``manifest.json`` from ``manifest`` (validated as a :class:`Manifest`) with a fresh
    integrity map; the manifest as written. For tools that edit a bundle's manifest on purpose."""
    if not isinstance(manifest, Manifest):
        manifest = Manifest.from_json({"schema_version": SCHEMA_VERSION, **manifest}, str(folder))
    return _write_manifest(Path(folder), manifest).to_json()


def _write_samples(folder: Path, samples: dict[str, np.ndarray]) -> None:
    tmp = folder / f".{SAMPLES}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        np.savez(f, **samples)  # type: ignore[arg-type]  # numpy's stub: a key could be allow_pickle
    os.replace(tmp, folder / SAMPLES)


def _write_reports(folder: Path, manifest: dict[str, Any], only_existing: bool = False) -> None:
    from .htmlreport import html_report
    from .report import markdown_report

    for name, render in (("report.md", markdown_report), ("report.html", html_report)):
        if not only_existing or (folder / name).is_file():
            (folder / name).write_text(render(manifest))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, Path):
        return obj.as_posix()
    raise TypeError(f"cannot serialise {type(obj).__name__}")


class Bundle:
    """A loaded, integrity-checked bundle."""

    def __init__(self, path: Path, manifest: dict[str, Any] | Manifest) -> None:
        self.path = Path(path)
        self.record = manifest if isinstance(manifest, Manifest) else Manifest.from_json(manifest, str(path))
        self.manifest: dict[str, Any] = self.record.to_json()
        """The manifest as JSON (the current schema's shape, also for a bundle written with an older one)."""

    @classmethod
    def write(cls, staging: Path, manifest: Manifest, samples: dict[str, np.ndarray]) -> Manifest:
        """Write a new bundle's ``samples.npz``, ``report.md``, ``report.html`` and (last, with the integrity map
        of everything else in ``staging``) ``manifest.json``. The only writer of these files."""
        _write_samples(staging, samples)
        _write_reports(staging, manifest.to_json())
        return _write_manifest(staging, manifest)

    @classmethod
    def load(cls, path: str | Path, check: bool = True) -> Bundle:
        path = Path(path)
        mf = path / MANIFEST
        if not mf.is_file():
            raise BundleError(f"{path} is not a qdeploy bundle (no {MANIFEST}); create one with `qdeploy deploy`")
        try:
            manifest = json.loads(mf.read_text())
        except json.JSONDecodeError as exc:
            raise IntegrityError(f"{mf} is not valid JSON ({exc}); the bundle is damaged: deploy again") from None
        bundle = cls(path, Manifest.from_json(manifest, str(path)))
        if check:
            bundle.check_integrity()
        return bundle

    def check_integrity(self) -> None:
        files = self.manifest.get("files")
        if not isinstance(files, dict) or not files or not isinstance(self.manifest.get("artifacts"), list):
            raise IntegrityError(f"bundle {self.path}: the manifest has no integrity map or no artifacts; refusing "
                                 f"it: deploy again")
        root = self.path.resolve()
        for rel in list(files) + [a.get("path", "") for a in self.manifest["artifacts"]]:
            if not (self.path / rel).resolve().is_relative_to(root):
                raise IntegrityError(f"bundle {self.path}: path {rel!r} points outside the bundle; refusing it")
        for rel, digest in files.items():
            f = self.path / rel
            if not f.is_file():
                raise IntegrityError(f"bundle {self.path}: {rel} is missing; the bundle is incomplete: deploy again")
            if sha256_file(f) != digest:
                raise IntegrityError(f"bundle {self.path}: {rel} was modified after the bundle was written (sha256 "
                                     f"mismatch); refusing to use it: deploy again")
        for art in self.artifacts:
            if path_sha256(self.path / art["path"]) != art["sha256"]:
                raise IntegrityError(f"bundle {self.path}: artifact {art['path']} does not match its sha256; "
                                     f"deploy again")

    def unlisted_files(self) -> list[str]:
        """Files in the bundle folder that its manifest does not list (added after it was written)."""
        listed = set(self.manifest.get("files", {})) | {MANIFEST}
        return sorted(rel for f in self.path.rglob("*") if f.is_file()
                      and (rel := f.relative_to(self.path).as_posix()) not in listed)

    @property
    def artifacts(self) -> list[dict[str, Any]]:
        return self.manifest["artifacts"]

    @property
    def reference_path(self) -> Path:
        return self.path / self.manifest["reference"]["path"]

    def artifact(self, key: int | str) -> dict[str, Any]:
        if isinstance(key, int):
            return self.artifacts[key]
        for art in self.artifacts:
            if art["id"] == key:
                return art
        raise BundleError(f"bundle {self.path} has no artifact {key!r}; it has "
                          f"{', '.join(a['id'] for a in self.artifacts)}")

    @property
    def threads(self) -> int:
        """The intra-op threads the bundle's latencies were measured with (1 for bundles that do not say)."""
        return int(self.manifest.get("latency_measured_on", {}).get("threads") or 1)

    def runner(self, key: int | str = 0, threads: int | None = None) -> Any:
        """A runner for one artifact, through the backend that built it, with ``threads`` intra-op threads
        (default: :attr:`threads`, what the deploy measured with)."""
        from .plugins import get_registry

        art = self.artifact(key)
        backend = get_registry().backends.get(art["backend"])
        if backend is None:
            raise BundleError(f"artifact {art['id']} needs the {art['backend']!r} backend, which is not installed")
        return backend.runner(self.path / art["path"], {**art.get("meta", {}), "threads": threads or self.threads})

    def judge_runner(self, key: int | str = 0, threads: int | None = None) -> tuple[Any, str]:
        """``(runner, numerics)``: what an artifact's accuracy is re-checked with here, as the deploy checked it --
        the bundle profile's exact INT8 accumulation emulated where this host's kernels differ
        (:func:`qdeploy.profile_numerics.target_judge`, ``numerics`` says so), else :meth:`runner`."""
        art = self.artifact(key)
        data = (self.manifest.get("profile") or {}).get("data") or {}
        if data.get("name") and data.get("device"):
            from .profile_numerics import target_judge
            from .profiles import Profile

            # the numerics need the device class, its architecture and CPU flags only
            flags = tuple(str(f) for f in data.get("cpu_flags") or ())
            target = Profile(name=str(data["name"]), description="", device=str(data["device"]), backends=(),
                             arch=str(data.get("arch") or ""), cpu_flags=flags)
            judge, numerics = target_judge(target, art["backend"], self.path / art["path"], threads or self.threads)
            if judge is not None:
                return judge, numerics
        return self.runner(key, threads), ""

    def reference_runner(self, threads: int | None = None) -> Any:
        from .backend import OrtRunner
        return OrtRunner(self.reference_path, threads=threads or self.threads)

    def samples(self) -> dict[str, np.ndarray]:
        """Warm-up samples: ``input:<name>``, ``reference:<output>`` and ``<artifact id>:<output>`` arrays."""
        with np.load(self.path / SAMPLES) as data:
            return dict(data)

    # --- verification data, and replacing what a later verification found (build-engine) ---------------------
    @property
    def budget(self) -> Any:
        """The accuracy budget of the spec the bundle was deployed with (a :class:`~qdeploy.spec.Budget`)."""
        from .spec import QuantSpec
        return QuantSpec.from_dict(self.manifest["spec"]).budget

    @property
    def budget_output(self) -> str:
        return self.manifest["budget_output"]

    def stored_inputs(self) -> dict[str, np.ndarray]:
        """The warm-up inputs (``input:<name>`` of :meth:`samples`), by input name."""
        return {k.split(":", 1)[1]: v for k, v in self.samples().items() if k.startswith("input:")}

    def verification_data(self, val: Any = None) -> tuple[dict[str, np.ndarray], np.ndarray | None, str]:
        """``(inputs, labels, source)`` to re-verify the bundle on: ``val`` (a path, as ``--val`` takes) checked
        against the manifest's model inputs, or the stored warm-up samples (no labels). Unlabelled ``val`` for a
        ``top1_accuracy`` budget is a DataError: nothing recorded belongs to those samples."""
        if val is None:
            return self.stored_inputs(), None, "the bundle's stored samples"
        from .calibration import open_data
        from .errors import DataError
        from .model import ModelHandle, TensorInfo

        inputs = [TensorInfo(i["name"], tuple(i["shape"]), i["dtype"]) for i in self.manifest["model"]["inputs"]]
        handle = ModelHandle(self.reference_path, inputs, [], {}, "", "onnx", "")
        data = open_data(val, handle, "validation",
                         hint="Give samples of the shape this bundle's model takes (its manifest's model.inputs)")
        if data is None:
            raise DataError(f"no validation data at {val!r}")
        x, y = data.arrays()
        if y is None and self.budget.metric == "top1_accuracy":
            raise DataError(f"validation data {val} has no labels, and this bundle's budget is top1_accuracy: "
                            f"add the labels under 'y' (or a y.npy beside the .npy files)")
        return x, y, f"validation data {val}"

    def reference_run(self, inputs: dict[str, np.ndarray], labels: np.ndarray | None = None,
                      threads: int | None = None, extra: Any = None, source: str = "") -> Any:
        """The FP32 reference run on ``inputs`` (:func:`qdeploy.verify.run_reference`) with the metrics plugins
        registered (``extra``, default: the registry's) and ``threads`` (default: :attr:`threads`)."""
        from .verify import run_reference

        if extra is None:
            from .plugins import get_registry
            extra = get_registry().metrics
        return run_reference(self.reference_path, inputs, labels, threads=threads or self.threads, extra=extra,
                             label_output=self.budget_output, source=source or "validation data")

    def recorded(self, key: int | str) -> Any:
        """What artifact ``key`` was verified with (:class:`qdeploy.verify.Recorded`): the warm-up inputs, its
        outputs on them and its budget verdict; None when the bundle holds no outputs of it."""
        from dataclasses import fields

        from .verify import BudgetResult, Recorded

        art = self.artifact(key)
        samples = self.samples()
        prefix = f"{art['id']}:"
        outputs = {k[len(prefix):]: v for k, v in samples.items() if k.startswith(prefix)}
        if not outputs or not isinstance(art.get("budget"), dict):
            return None
        names = {f.name for f in fields(BudgetResult)}
        budget = BudgetResult(**{k: v for k, v in art["budget"].items() if k in names})
        return Recorded(self.stored_inputs(), outputs, budget)

    def replace_artifact(self, record: dict[str, Any] | ArtifactRecord, outputs: dict[str, np.ndarray] | None = None,
                         events: list[dict[str, Any]] | tuple = ()) -> None:
        """Replace the manifest record of artifact ``record.id`` with ``record`` (its sha256 and sizes
        recomputed from its files), its verified outputs in ``samples.npz`` with ``outputs`` (the artifact's
        outputs on the stored warm-up inputs), append ``events``, keep the serving chain's rule (artifacts that
        met their budget before those that did not; otherwise the order stays), then rewrite the reports and
        the manifest with its integrity map. The bundle is the writer: plugins call this, never write files."""
        if not isinstance(record, ArtifactRecord):
            record = ArtifactRecord.from_json(dict(record), f"replacement for bundle {self.path}")
        arts = self.record.artifacts
        index = next((i for i, a in enumerate(arts) if a.id == record.id), None)
        if index is None:
            raise BundleError(f"bundle {self.path} has no artifact {record.id!r} to replace")
        path = self.path / record.path
        record.sha256, record.size_bytes = path_sha256(path), path_size(path)
        ref_size = self.record.reference.get("size_bytes")
        if ref_size:
            record.size_vs_fp32 = record.size_bytes / ref_size
        if outputs is not None:
            samples = self.samples()
            n = len(next(v for k, v in samples.items() if k.startswith("input:")))
            samples = {k: v for k, v in samples.items() if not k.startswith(f"{record.id}:")}
            samples.update({f"{record.id}:{k}": np.asarray(v)[:n] for k, v in outputs.items()})
            _write_samples(self.path, samples)
        arts[index] = record
        arts.sort(key=lambda a: not a.budget.get("passed", True))  # stable: else the order stays
        self.record.events.extend(events)
        _write_reports(self.path, self.record.to_json(), only_existing=True)
        self.manifest = _write_manifest(self.path, self.record).to_json()
