"""The ``qdeploy`` command line: a thin layer over :mod:`qdeploy.pipeline`.

Exit codes: 0 success; 1 a check failed (the accuracy budget under ``strict``, no backend could build, ``verify``
found a failing, tampered or unlisted file); 2 usage or bad input (one line on stderr, no traceback); 3 an
internal error (a bug: please report it); 130 interrupted.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from . import __version__
from .errors import DataError, QDeployError


def _echo(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class _Bar:
    """Progress of long steps on stderr, with elapsed time: a one-line bar on a terminal; elsewhere (CI, pipes)
    one log line when a step that took more than a couple of seconds ends."""

    def __init__(self) -> None:
        self.tty = sys.stderr.isatty()
        self.last = time.monotonic()
        self.started: dict[str, float] = {}

    def __call__(self, what: str, done: int, total: int) -> None:
        now = time.monotonic()
        start = self.started.setdefault(what, now)
        if done >= total:
            self.started.pop(what, None)
        elapsed = now - start
        if not self.tty:  # a log line at the end of a step that took a while, and every 15 s during one
            if (done >= total and elapsed >= 2.0) or (done < total and now - self.last >= 15.0 and elapsed >= 15.0):
                self.last = now
                print(f"{what}: {done}/{total} in {elapsed:.1f} s", file=sys.stderr, flush=True)
            return
        if now - self.last < 0.1 and done < total:
            return
        self.last = now
        width = 30
        fill = int(width * done / max(total, 1))
        end = "\n" if done >= total else ""
        sys.stderr.write(f"\r{what:<24} [{'#' * fill}{'.' * (width - fill)}] {done}/{total} {elapsed:5.1f} s{end}")
        sys.stderr.flush()


def _registry():
    from .plugins import get_registry
    return get_registry()


def cmd_deploy(args: argparse.Namespace) -> int:
    from .pipeline import deploy
    from .report import events_text, summary_rows, text_table

    if args.targets_file or "," in (args.target or ""):
        return _deploy_fanout(args)

    bundle = deploy(args.model, target=args.target, spec=args.spec, calib=args.calib, val=args.val,
                    output=args.output, input_shape=args.input_shape, backends=args.backend, policy=args.policy,
                    per_layer=args.per_layer, echo=_echo, progress=_Bar(), threads=args.threads,
                    objective=args.objective)
    m = bundle.manifest
    print(f"\nqdeploy {__version__}: {m['model']['source']} -> {args.output} (target {m['profile']['name']})\n")
    print(text_table(*summary_rows(m)))
    if m["events"]:
        print("\nevents:")
        for line in events_text(m["events"]):
            print(f"  {line}")
    failing = [a["id"] for a in m["artifacts"] if not a["budget"]["passed"]]
    if failing:
        print(f"\nwarning: {', '.join(failing)} did not meet the budget; kept as the best found (policy "
              f"{m['spec']['fallback']['policy']})")
    print(f"\nbundle: {args.output}/manifest.json, report: {args.output}/report.md")
    return 0


def cmd_sensitivity(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .pipeline import sensitivity
    from .report import text_table

    table = sensitivity(args.model, target=args.target, spec=args.spec, calib=args.calib, val=args.val,
                        input_shape=args.input_shape, backends=args.backend, threads=args.threads, echo=_echo,
                        progress=_Bar())
    rows = [[r.layer, r.op_type, f"{r.sqnr_only_quantized:.1f}",
             "" if r.sqnr_all_but_this is None else f"{r.sqnr_all_but_this:.1f}",
             f"{r.cost_bytes / 1024:.1f} KiB"] for r in table.ranked()]
    print(f"\nsensitivity of {table.output!r} to each layer in {table.precision} ({table.target}; SQNR in dB on the "
          f"{table.samples} samples quantization hurts most; all layers quantized: {table.sqnr_all_quantized:.1f} dB"
          f"{'; from the cache' if table.cached else ''})\n")
    print(text_table(["layer", "op", "only it quantized", "all but it", "cost (float weights)"], rows))
    out = Path(args.output)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        table.write(out.with_suffix(".json"), out.with_suffix(".csv"))
    except OSError as exc:
        raise QDeployError(f"cannot write {out}: {exc.strerror or exc}; choose a writable -o path") from None
    print(f"\nwrote {out.with_suffix('.json')} and {out.with_suffix('.csv')}")
    return 0


def _deploy_fanout(args: argparse.Namespace) -> int:
    from .fanout import deploy_many, parse_targets

    targets = parse_targets(args.target if args.target != "detect" or not args.targets_file else "",
                            args.targets_file)
    result = deploy_many(args.model, targets, args.output, spec=args.spec, calib=args.calib, val=args.val,
                         input_shape=args.input_shape, backends=args.backend, policy=args.policy,
                         threads=args.threads, objective=args.objective, ray_address=args.ray_address,
                         use_ray=False if args.no_ray else None, echo=_echo)
    ok = sum(1 for t in result.index["targets"] if t["exit_code"] == 0)
    print(f"\nqdeploy {__version__}: {len(targets)} targets -> {args.output} ({ok} bundles, "
          f"{result.index['mode']}, {result.index['wall_s']:.0f} s); index: {args.output}/index.json")
    return result.exit_code


def cmd_check(args: argparse.Namespace) -> int:
    from .pipeline import check

    result = check(args.model, target=args.target, spec=args.spec, input_shape=args.input_shape,
                   backends=args.backend, policy=args.policy)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"profile {result['profile']}: {result['model']} ({result['layers']} quantizable layers)")
    for w in result["warnings"]:
        print(f"  warning: {w}")
    for e in result["entries"]:
        if e["runnable"]:
            counts: dict[str, int] = {}
            for p in e["layers"].values():
                counts[p] = counts.get(p, 0) + 1
            layers = ", ".join(f"{n} {p}" for p, n in counts.items())
            print(f"  {e['target']:<22} runs {e['precision']} ({layers}); ladder {' -> '.join(e['ladder'])}; "
                  f"verified {e['verified_on']}")
        else:
            print(f"  {e['target']:<22} cannot run")
        for ev in e["events"]:
            print(f"      [{ev['code']}] {ev['message']}")
        for w in e["warnings"]:
            print(f"      warning: {w}")
        if e.get("int8_accuracy_numerics"):
            print(f"      INT8 accuracy judged with {e['int8_accuracy_numerics']}")
        t = e.get("transforms")
        if t and t["mode"] != "off":
            on = [f"{k} ({v['apply']})" if isinstance(v["apply"], str) else k
                  for k, v in t["transforms"].items() if v["apply"] is not False]
            what = (", ".join(on) or "none would change this model") + ": " if t["transforms"] else ""
            print(f"      transforms ({t['mode']}): {what}{t['reason']}")
    if not any(e["runnable"] for e in result["entries"]):
        print("nothing in this profile can run the model here")
        return 1
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from .bundle import Bundle
    from .verify import verify_artifact

    profiles = None
    if args.profiles:  # a typo'd profile is exit 2 before any work
        from .pipeline import resolve_profile
        from .profile_numerics import parse_profiles
        profiles = parse_profiles(args.profiles, lambda name: resolve_profile(name, _registry()))
    elif args.json:
        raise QDeployError("--json writes the --profiles table: give --profiles too")
    bundle = Bundle.load(args.bundle)  # a modified or missing file raises IntegrityError: exit 1
    m = bundle.manifest
    extra_files = bundle.unlisted_files()
    status = 0
    if extra_files:
        status = 1
        print(f"bundle {args.bundle}: FAIL: {len(extra_files)} file(s) the manifest does not list (added after the "
              f"bundle was written): {', '.join(extra_files[:5])}{' ...' if len(extra_files) > 5 else ''}")
    else:
        print(f"bundle {args.bundle}: integrity ok ({len(m['files'])} files, sha256 checked, no unlisted file)")
    threads = args.threads or bundle.threads
    x, y, source = bundle.verification_data(args.val)
    if not args.val:
        print(f"no --val: re-checking on the {len(next(iter(x.values())))} stored samples")
    reference = bundle.reference_run(x, y, threads, extra=_registry().metrics, source=source)
    if profiles is not None:  # one row per artifact x profile: where it ran, the budget metric, the spread
        from .profile_numerics import verify_profiles, write_json

        table = verify_profiles(bundle, profiles, reference, bundle.budget, bundle.budget_output, threads)
        print(f"host: {table.host.describe()}\n{table.text()}")
        if args.json:
            write_json(table, args.json)
            print(f"wrote {args.json}")
        if not any(r.measured for r in table.rows):
            raise QDeployError(f"no artifact of bundle {args.bundle} could be verified under {args.profiles} here "
                               f"(see the reasons above)")
        return 1 if status or table.failed else 0
    checked = 0
    for art in bundle.artifacts:
        try:
            runner, numerics = bundle.judge_runner(art["id"], threads)
        except Exception as exc:  # a runtime missing here is reported, not fatal
            print(f"  {art['id']:<28} not runnable here: {exc}")
            continue
        try:  # one rule for unlabelled data: a label budget is judged on the outputs recorded when verified
            found = verify_artifact(runner, reference, bundle.budget, bundle.budget_output,
                                    recorded=bundle.recorded(art["id"]))
            verdict, detail = ("pass" if found.passed else "FAIL"), found.describe()
        except DataError as exc:  # the budget metric cannot be computed here, and nothing recorded to compare
            verdict, detail = "FAIL", str(exc)
        finally:
            runner.close()
        checked += 1
        if verdict == "FAIL":
            status = 1
        print(f"  {art['id']:<28} {verdict}: {detail} (verified_on {art['verified_on']})"
              + (f"\n  {'':<28} numerics: {numerics}" if numerics else ""))
    if not checked:
        raise QDeployError(f"no artifact of bundle {args.bundle} runs on this host: nothing was verified "
                           f"(see the lines above; install the backends or verify on the target)")
    return status


def cmd_backends(args: argparse.Namespace) -> int:
    reg = _registry()
    from .pipeline import resolve_profile

    profile = resolve_profile(args.target, reg) if args.target else None
    targets = profile.backends if profile else None
    names = sorted(set(reg.backends) | ({t.backend for t in targets} if targets else set()))
    print(f"{'backend':<14} {'target':<22} status")
    from .profiles import BackendTarget
    for name in names:
        entries = [t for t in targets if t.backend == name] if targets else [BackendTarget(name, ("fp32",))]
        for t in entries:
            if name not in reg.backends:
                print(f"{name:<14} {t.label:<22} not installed (plugins/{name})")
                continue
            caps = reg.backends[name].capabilities(t)
            if not caps.available:
                state = f"unavailable: {caps.reason}"
            elif caps.oracle:
                state = (f"built in: {', '.join(caps.precisions)} as the spec's exact numerics (fake quantization), "
                         f"verified by simulation, never served")
            elif caps.verified_on == "simulated":  # as `check` and `deploy` say it: BACKEND_UNAVAILABLE
                state = (f"runtime unavailable here{f' ({caps.reason})' if caps.reason else ''}: builds "
                         f"{', '.join(caps.precisions)} artifacts for the target, verified only by simulation "
                         f"(BACKEND_UNAVAILABLE)")
            else:
                state = f"available: {', '.join(caps.precisions)}; verified on {caps.verified_on}"
            print(f"{name:<14} {t.label:<22} {state}")
    return 0


def cmd_profiles(args: argparse.Namespace) -> int:
    reg = _registry()
    if args.action == "list":
        for name, prof in sorted(reg.profiles.items()):
            print(f"{name:<22} {prof.description}")
        return 0
    from .profiles import detect_profile_name
    name = detect_profile_name() if args.action == "detect" else args.name
    if args.action == "show" and not name:
        raise QDeployError("profiles show needs a profile NAME (see `qdeploy profiles list`)")
    if name.endswith(".toml"):  # a profile file of the user's own: validated like the shipped ones
        from .profiles import load_profile_file
        prof = load_profile_file(name)
    else:
        prof = reg.profile(name)
    if args.action == "detect":
        print(f"detected: {name}")
    print(json.dumps(prof.to_dict(), indent=2))
    return 0


def cmd_spec(args: argparse.Namespace) -> int:
    from .spec import QuantSpec, dumps_spec, load_spec, save_spec

    if args.file:
        if args.output:
            raise QDeployError("give either a spec FILE to validate or -o OUT to write the default spec, not both")
        spec = load_spec(args.file)  # a missing or invalid file is one clear error
        from .errors import bad_value
        from .spec import HIGHER_IS_BETTER
        metrics = {**HIGHER_IS_BETTER, **_registry().metrics}
        if spec.budget.metric not in metrics:  # a plugin's metric is fine; a typo is not
            raise bad_value("budget.metric", spec.budget.metric, sorted(metrics))
        print(f"{args.file}: valid (spec version {spec.version})")
        return 0
    if args.output:
        try:
            save_spec(QuantSpec(), args.output)
        except OSError as exc:
            raise QDeployError(f"cannot write {args.output}: {exc.strerror or exc}; choose a writable path") from None
        print(f"wrote the default spec to {args.output}")
        return 0
    print(dumps_spec(QuantSpec()), end="")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import logging

    from .serve import FallbackModel, serve

    logging.basicConfig(level=getattr(logging, args.log_level.upper()), stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    import math

    if not (math.isfinite(args.max_body_mb) and args.max_body_mb > 0):
        raise QDeployError(f"--max-body-mb {args.max_body_mb} must be a positive number of MiB, e.g. 32")
    if not 0 <= args.port <= 65535:
        raise QDeployError(f"--port {args.port} is not a TCP port; use 1-65535 (or 0 for any free port)")
    options = dict(name=args.name, policy=args.policy, reference_fallback=not args.no_reference,
                   breaker_errors=args.breaker_errors, breaker_window=args.breaker_window,
                   drift_sample=args.drift_sample, drift_window=args.drift_window, threads=args.threads,
                   allow_nonfinite=args.allow_nonfinite)
    max_body = int(args.max_body_mb * 1024 * 1024)
    if args.replicas is not None or args.ray_address:  # Ray Serve: N replicas, each with its own fallback chain
        replicas = 1 if args.replicas is None else args.replicas
        if replicas < 1:
            raise QDeployError(f"--replicas {replicas} must be at least 1")
        from .serve.ray_serve import import_ray, serve_ray

        import_ray()  # without Ray: one clear error naming the extra
        serve_ray(args.bundle, replicas=replicas, host=args.host, port=args.port, ray_address=args.ray_address,
                  max_body=max_body, options=options, log_level=args.log_level)
        return 0
    model = FallbackModel(args.bundle, **options)
    serve(model, host=args.host, port=args.port, max_body=max_body,
          log_level="warning" if args.log_level == "info" else args.log_level)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .export_triton import Skipped, TritonModel, export_triton

    if args.max_batch_size is not None and args.max_batch_size < 0:
        raise QDeployError(f"--max-batch-size {args.max_batch_size} must be >= 0 (0: no batching)")
    if args.instances < 1:
        raise QDeployError(f"--instances {args.instances} must be >= 1 (model instances per device)")
    done = export_triton(args.bundle, args.output, name=args.name, max_batch_size=args.max_batch_size,
                         instances=args.instances, force=args.force)
    print(f"Triton model repository: {done.path} ({len(done.models)} model(s); the bundle's fallback order):")
    chain: list[TritonModel | Skipped] = [*done.models, *done.skipped]
    for m in sorted(chain, key=lambda x: x.position):
        if isinstance(m, Skipped):
            print(f"  {m.position}. {m.artifact}: skipped: {m.reason}")
        else:
            print(f"  {m.position}. {m.label}: {m.name} ({m.platform}, {m.kind} x{m.count}, max_batch_size "
                  f"{m.max_batch_size})")
    print(f"validated: every config.pbtxt parsed into Triton's ModelConfig; every model file loaded with matching "
          f"inputs and outputs\nfallback order and budgets: {done.path}/qdeploy_fallback.json and README.md")
    return 0


def _threads(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of threads >= 1")
    return n


class _Parser(argparse.ArgumentParser):
    """argparse with the project's error form: one line naming the problem and where to look, exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"qdeploy: error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="qdeploy", description="Verified, quantized deployments of one FP32 model "
                                "for many target devices.")
    p.add_argument("--version", action="version", version=f"qdeploy {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def model_args(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("model", help="model.onnx, model.pt2, file.py:factory or package.module:attr")
        sp.add_argument("--target", "-t", default="detect", help="hardware profile name or .toml (default: detect); "
                        "deploy takes several, comma separated (a fan-out)")
        sp.add_argument("--spec", "-s", help="quantization spec (.toml/.yaml/.json); default: INT8 static")
        sp.add_argument("--input-shape", help="input shape with batch, e.g. 1x3x32x32 (PyTorch models)")
        sp.add_argument("--backend", "-b", action="append", help="only these backends of the profile (repeatable)")
        sp.add_argument("--policy", choices=("strict", "warn", "auto"), help="override the spec's fallback policy")

    d = sub.add_parser("deploy", help="build, verify and bundle artifacts for a target")
    model_args(d)
    d.add_argument("--calib", help="calibration data: folder of .npy/.npz, or one .npz")
    d.add_argument("--val", help="validation data (labels under 'y' for top-1 accuracy)")
    d.add_argument("--output", "-o", default="bundle", help="bundle folder (default: bundle)")
    d.add_argument("--per-layer", action="store_true", help="add per-layer sensitivity to the report")
    d.add_argument("--targets-file", help="fan out: one profile per line (or a TOML/JSON list under 'targets'); "
                   "each target's bundle goes to OUTPUT/<target>/, OUTPUT/index.json lists them")
    d.add_argument("--ray-address", help="fan out on this Ray cluster (default: a local Ray with this machine's cores)")
    d.add_argument("--no-ray", action="store_true", help="fan out one target after another, even with Ray installed")
    d.add_argument("--objective", choices=("latency", "size", "accuracy"), default="latency",
                   help="which verified configuration each backend keeps among those that meet the budget: the "
                   "fastest (default), the smallest or the most accurate")
    d.add_argument("--threads", type=_threads, help="intra-op threads of every runner while verifying and timing "
                   "(default: the profile's, else 1); the bundle records it and `serve` uses it")
    d.set_defaults(func=cmd_deploy)

    se = sub.add_parser("sensitivity", help="the layer-wise sensitivity table alone (no artifact built), ranked, "
                        "as JSON and CSV")
    model_args(se)
    se.add_argument("--calib", help="calibration data: folder of .npy/.npz, or one .npz")
    se.add_argument("--val", help="validation data (default: the calibration data)")
    se.add_argument("--output", "-o", default="sensitivity", help="write OUTPUT.json and OUTPUT.csv (default: "
                    "sensitivity)")
    se.add_argument("--threads", type=_threads, help="intra-op threads (default: the profile's, else 1)")
    se.set_defaults(func=cmd_sensitivity)

    c = sub.add_parser("check", help="what would run on a target, what falls back and why (no build)")
    model_args(c)
    c.add_argument("--json", action="store_true", help="print the result as JSON")
    c.set_defaults(func=cmd_check)

    v = sub.add_parser("verify", help="integrity and accuracy re-check of a bundle")
    v.add_argument("bundle")
    v.add_argument("--val", help="validation data (default: the bundle's stored samples)")
    v.add_argument("--threads", type=_threads, help="intra-op threads per runner (default: the bundle's)")
    v.add_argument("--profiles", help="verify each artifact under these hardware profiles' numerics (names or "
                   ".toml, comma separated): one row per artifact x profile, run on its runtime where this host "
                   "matches the profile, else simulated and marked so; exit 1 when a row fails or an artifact's "
                   "budget metric spreads more than one point (0.01 for fractions) between profiles")
    v.add_argument("--json", metavar="PATH", help="also write the --profiles table as JSON to PATH")
    v.set_defaults(func=cmd_verify)

    b = sub.add_parser("backends", help="every registered backend, available or not, and why")
    b.add_argument("--target", "-t", help="show the entries of this profile")
    b.set_defaults(func=cmd_backends)

    pr = sub.add_parser("profiles", help="hardware profiles: list | show NAME | detect")
    pr.add_argument("action", choices=("list", "show", "detect"))
    pr.add_argument("name", nargs="?")
    pr.set_defaults(func=cmd_profiles)

    sp = sub.add_parser("spec", help="print the default spec, write it (-o), or validate a spec file")
    sp.add_argument("file", nargs="?")
    sp.add_argument("--output", "-o")
    sp.set_defaults(func=cmd_spec)

    sv = sub.add_parser("serve", help="serve a bundle over HTTP (Open Inference Protocol v2), demoting along its "
                        "fallback chain on load failure, runtime errors or accuracy drift")
    sv.add_argument("bundle")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, loopback only)")
    sv.add_argument("--port", "-p", type=int, default=8000, help="port (default: 8000)")
    sv.add_argument("--name", help="model name in /v2/models/NAME (default: the bundle folder's name)")
    sv.add_argument("--policy", choices=("auto", "warn", "strict"), default="auto",
                    help="auto/warn: demote along the chain; strict: never demote, fail loudly (default: auto)")
    sv.add_argument("--no-reference", action="store_true", help="do not fall back to the FP32 reference at the end")
    sv.add_argument("--breaker-errors", type=int, default=3,
                    help="demote an artifact after this many runtime errors (default 3) ...")
    sv.add_argument("--breaker-window", type=int, default=20, help="... among an artifact's last N calls (20)")
    sv.add_argument("--drift-sample", type=float, default=0.05,
                    help="fraction of requests shadow-run through the FP32 reference (default 0.05; 0: off)")
    sv.add_argument("--drift-window", type=int, default=64, help="shadowed samples per drift decision (64)")
    sv.add_argument("--max-body-mb", type=float, default=32.0, help="largest request body in MiB (default 32)")
    sv.add_argument("--threads", type=_threads, help="intra-op threads per runner (default: what the bundle's "
                    "latencies were measured with)")
    sv.add_argument("--allow-nonfinite", action="store_true",
                    help="accept NaN/Infinity in request inputs (refused with 400 by default)")
    sv.add_argument("--replicas", type=int, help="serve as a Ray Serve application with N replicas, each with its "
                    "own fallback chain (needs qdeploy[ray]; default: one process, no Ray)")
    sv.add_argument("--ray-address", help="run the replicas on this Ray cluster (default with --replicas: a local "
                    "Ray started here; implies --replicas 1 if not given)")
    sv.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")
    sv.set_defaults(func=cmd_serve)

    ex = sub.add_parser("export", help="export a bundle for a serving system: triton (a Triton Inference Server "
                        "model repository)")
    ex_sub = ex.add_subparsers(dest="format", required=True)
    et = ex_sub.add_parser("triton", help="write a Triton model repository: each servable artifact a model, the FP32 "
                           "reference last, the fallback order and budgets for the operator; validated before it is "
                           "moved into place")
    et.add_argument("bundle")
    et.add_argument("--output", "-o", required=True, help="repository folder to write (must be new or empty)")
    et.add_argument("--name", help="model name prefix (default: the bundle folder's name)")
    et.add_argument("--max-batch-size", type=int, help="largest batch of Triton's dynamic batcher (default: the batch "
                    "the bundle's latencies were measured at; 0: no batching)")
    et.add_argument("--instances", type=int, default=1, help="model instances per device (default 1)")
    et.add_argument("--force", action="store_true", help="replace -o if it holds a previous qdeploy export")
    et.set_defaults(func=cmd_export)
    return p


def main(argv: list[str] | None = None) -> int:
    from .plugins import quiet_frameworks

    quiet_frameworks()
    try:
        parser = build_parser()
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        _registry().pm.hook.qdeploy_add_commands(subparsers=sub)
        args = parser.parse_args(argv)
        return int(args.func(args) or 0)
    except QDeployError as exc:
        print(f"qdeploy: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("qdeploy: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if os.environ.get("QDEPLOY_DEBUG"):
            raise
        print(f"qdeploy: internal error: {type(exc).__name__}: {exc} (set QDEPLOY_DEBUG=1 for the traceback)",
              file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
