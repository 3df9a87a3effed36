"""``rmlx-parity``: run parity, list stages, (re)generate fixtures.

Exit codes: 0 all pass, 1 a parity failure, 2 bad usage or bad input (one clear line,
nothing written), 125 this revision cannot be tested (for ``git bisect run``), 130 interrupted
(SIGINT, Ctrl-C), 143 terminated (SIGTERM).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

EXIT_PASS, EXIT_FAIL, EXIT_BAD_INPUT, EXIT_UNTESTABLE = 0, 1, 2, 125
EXIT_INTERRUPTED, EXIT_TERMINATED = 130, 143  # 128 + SIGINT, 128 + SIGTERM, as a shell reports them
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: what a shell reports for a writer whose reader left (`| head`)
# environment switches of the port: unset, empty, "0" (rmlx's own code) or "1" (MLX's own)
SWITCHES = ("RMLX_NATIVE_MATH", "RMLX_NATIVE_KERNELS", "RMLX_NATIVE_SGEMM")


def fixtures_dir() -> Path:
    """The embedded default: ``$RMLX_FIXTURES``, else the installed package ``rmlx_fixtures`` (the
    repository's ``fixtures/`` in an editable install, a copy in site-packages otherwise)."""
    if os.environ.get("RMLX_FIXTURES"):
        return Path(os.environ["RMLX_FIXTURES"])
    import importlib.util

    spec = importlib.util.find_spec("rmlx_fixtures")
    if spec is None or spec.origin is None:  # a source tree run without installing
        return Path(__file__).resolve().parents[1] / "fixtures"
    return Path(spec.origin).parent


def default_models() -> list[Path]:
    models = fixtures_dir() / "models"
    return sorted(p for p in models.iterdir() if (p / "config.json").is_file()) if models.is_dir() else []


def default_images() -> list[Path]:
    return sorted((fixtures_dir() / "images").glob("*.png"))


class Untestable(Exception):
    """This revision cannot be tested (exit 125: ``git bisect run`` skips it)."""


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)  # --decode-step is an error, not --decode-steps
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # argparse exits 2 on bad usage already; keep it to one line
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message}\n")


def _shard(text: str) -> tuple[int, int]:
    k, sep, n = text.partition("/")
    if not (sep and k.isdigit() and n.isdigit() and 1 <= int(k) <= int(n)):
        raise argparse.ArgumentTypeError(f"expected K/N with 1 <= K <= N, got {text!r}")
    return int(k), int(n)


def _jobs(text: str) -> int | str:
    from parity.jobs import parse_jobs
    from rmlx.errors import InputError

    try:
        return parse_jobs(text)
    except InputError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _jobs_option(parser: argparse.ArgumentParser, help: str) -> None:
    """``--jobs N|auto`` (``parity.jobs``), its default from the environment."""
    from parity.jobs import ENV

    parser.add_argument("--jobs", type=_jobs, default=os.environ.get(ENV, "auto"), metavar="N", help=help)


def _tol(text: str):
    """``--tol STAGE_GLOB=ATOL[,RTOL]`` -> (glob, atol, rtol or None); bad text is a usage error."""
    from parity.tolerances import parse_override
    from rmlx.errors import InputError

    try:
        return parse_override(text)
    except InputError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix(f"--tol {text!r}: ")) from None


_TOL_HELP = ("override the named tolerance of the stages matching GLOB (repeatable; the last match wins; RTOL "
             "defaults to the stage's own), e.g. 'layers.*.out=5e-3'; recorded in the report")
_FORCE_HELP = "let --json replace an existing file (default: refuse)"
_WIDE_HELP = "print every column of the stage table (default: a table that fits 100 columns)"


def _version() -> str:
    """``rmlx-parity X (transformers Y, torch Z, mlx W, numpy V)``: the package and what it is tested
    with, from package metadata (nothing imported; "not installed" for an absent extra)."""
    from parity.provenance import package_version

    def of(dist: str) -> str:
        return package_version(dist) or "not installed"

    deps = ", ".join(f"{d} {of(d)}" for d in ("transformers", "torch", "mlx", "numpy"))
    return f"rmlx-parity {of('rmlx')} ({deps})"


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="rmlx-parity", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=_version())
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    r = _Parser(add_help=False)  # the options of a run, shared by run and gate
    r.add_argument("--model", action="append", type=Path, metavar="DIR",
                   help="a checkpoint directory; its config.json model_type picks the model family "
                        "(repeatable; default: every fixture model)")
    r.add_argument("--image", action="append", type=Path, metavar="PATH",
                   help="an image file (repeatable; default: the fixture battery)")
    r.add_argument("--case", action="append", metavar="GLOB",
                   help="run only the scenarios matching GLOB (repeatable), e.g. 'two-images', 'image/solid-*'")
    r.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    r.add_argument("--mode", choices=("free", "teacher"), default="free",
                   help="free: each side runs its own forward; "
                        "teacher: each candidate stage gets the reference's input")
    r.add_argument("--stages", action="append", metavar="GLOB", help="compare only matching stages (repeatable)")
    r.add_argument("--attn-implementation", choices=("eager", "sdpa"), default="eager",
                   help="HF attention implementation (default eager)")
    r.add_argument("--inject", action="append", default=[], metavar="NAME",
                   help="plant a defect from the family's catalog (repeatable; see 'rmlx-parity faults')")
    _family_options(r)
    r.add_argument("--decode-steps", type=int, default=4, metavar="N",
                   help="greedy decode steps after the prefill, logits compared at each (default 4)")
    r.add_argument("--quantize", choices=("mxfp8",), default=None,
                   help="quantize the candidate on load (patch_dense and the decoder linears); the reference runs "
                        "with its own codec's dequantized weights, and the unquantized model gives the cost")
    r.add_argument("--tol", action="append", type=_tol, metavar="GLOB=ATOL[,RTOL]", help=_TOL_HELP)
    r.add_argument("--json", type=Path, metavar="PATH", help="also write the JSON record here")
    r.add_argument("--force", action="store_true", help=_FORCE_HELP)
    r.add_argument("--wide", action="store_true", help=_WIDE_HELP)
    r.add_argument("--dump", type=Path, metavar="DIR",
                   help="write DIR/<case>/{reference,candidate}.safetensors (keys: the stage names --stages selects, "
                        "and input.*)")
    r.add_argument("--report-dir", type=Path, metavar="DIR",
                   help="default reports/<UTC time>-<commit>/, and reports/latest points at it")
    r.add_argument("--no-oracle", action="store_true", help="skip the float64 NumPy oracle columns")
    r.add_argument("--shard", type=_shard, metavar="K/N",
                   help="run only the K-th of N deterministic slices of the cases (CI matrix jobs; 1 <= K <= N)")
    r.add_argument("--stream", action="store_true",
                   help="one decoder layer at a time on both sides, weights read from the memory-mapped "
                        "checkpoint: for models larger than memory (peak ~ small modules + one layer + logits)")
    _jobs_option(r, "processes the cases are dealt to (default auto: one per core, at most 4 and one per 16 "
                    "cases, for checkpoints under 256 MiB in all, else 1; --stream: 1; env RMLX_PARITY_JOBS sets "
                    "the default). The record is the same whatever N, but for its timings")
    r.add_argument("--threads", type=int, default=1, metavar="N",
                   help="intra-op threads of torch and of the BLAS under MLX (default 1: the same numbers in "
                        "every process; more threads are faster but MKL's sums may then differ run to run)")

    sub.add_parser("run", parents=[r], help="compare every stage of rmlx against HF transformers")

    g = sub.add_parser("gate", parents=[r],
                       help="run, then fail if any stage's error grew past its committed baseline (git bisect run)")
    g.add_argument("--baseline", type=Path, required=True, metavar="FILE",
                   help="a baseline JSON (fixtures/baselines/*.json for the embedded default)")
    g.add_argument("--record", type=Path, metavar="FILE",
                   help="gate this run record (run --json, or a report folder's report.json) instead of running; "
                        "the run options are then those of the record")
    g.add_argument("--update-baseline", action="store_true",
                   help="record this run as FILE instead of gating (atomic; refused when the run fails parity)")
    g.add_argument("--drift-ratio", type=float, default=2.0, metavar="R",
                   help="allowed = baseline * R + FLOOR (default 2.0)")
    g.add_argument("--drift-floor", type=float, default=1e-5, metavar="FLOOR",
                   help="absolute allowance on top (default 1e-5, torch.testing's atol)")
    g.add_argument("--cross-machine-ratio", type=float, default=8.0, metavar="X",
                   help="R for a baseline recorded on another machine (processor, vector extension, cores, BLAS "
                        "or numeric packages differ; default 8.0)")

    t = sub.add_parser("selftest", help="plant every catalogued defect; the harness must catch and localise each")
    t.add_argument("--fault", action="append", metavar="NAME", help="only these defects (repeatable)")
    _jobs_option(t, "processes the runs are dealt to (default auto, as for run; the outcomes are the same)")
    t.add_argument("--mode", choices=("both", "free", "teacher"), default="both")
    t.add_argument("--model", action="append", type=Path, metavar="DIR", help="default: every fixture model")
    t.add_argument("--json", type=Path, metavar="PATH", help="also write the self-test record here")
    t.add_argument("--force", action="store_true", help=_FORCE_HELP)
    t.add_argument("--report-dir", type=Path, metavar="DIR", help="default reports/selftest-<UTC time>-<commit>/")

    st = sub.add_parser("stages", help="list the public stage names of a model in forward order")
    st.add_argument("--model", type=Path, metavar="DIR", help="default: the first fixture model")
    st.add_argument("--stages", action="append", metavar="GLOB")
    sub.add_parser("faults", help="list the planted defects")

    c = sub.add_parser("convert", help="write an MLX-style quantized copy of a checkpoint (atomically)")
    c.add_argument("--quantize", choices=("mxfp8",), required=True)
    c.add_argument("--keep", type=Path, metavar="FILE",
                   help="leave these modules in full precision: the keep.json 'rmlx-parity debug precision' writes")
    c.add_argument("src", type=Path, metavar="SRC")
    c.add_argument("dst", type=Path, metavar="DST")

    cp = sub.add_parser("compare", help="compare two stage dumps (run --dump, or another port's) with the "
                                        "run's tolerances")
    cp.add_argument("ref", type=Path, metavar="REF",
                    help="the reference dump: a .safetensors file keyed by stage names, or a folder of dumps "
                         "(DIR/<case>/reference.safetensors as 'run --dump' writes, or DIR/<case>.safetensors)")
    cp.add_argument("cand", type=Path, metavar="CAND", nargs="?",
                    help="the candidate dump (a file, or a folder: DIR/<case>/candidate.safetensors or "
                         "DIR/<case>.safetensors); default: REF, a 'run --dump' folder holding both sides")
    cp.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                    help="the dtype whose tolerances apply (auto: the dumps' 'dtype' metadata, else bfloat16 "
                         "when a dump stores bf16 tensors, else float32)")
    cp.add_argument("--mode", choices=("auto", "free", "teacher"), default="auto",
                    help="which tolerance table: the dumps' run was free-running or teacher-forced (auto: the "
                         "dumps' 'mode' metadata, else free)")
    cp.add_argument("--stages", action="append", metavar="GLOB",
                    help="compare only matching stages (repeatable)")
    cp.add_argument("--require-all", action="store_true",
                    help="a stage in one dump only fails (default: it is listed apart, and the stages both "
                         "dumps hold are compared)")
    cp.add_argument("--tol", action="append", type=_tol, metavar="GLOB=ATOL[,RTOL]", help=_TOL_HELP)
    cp.add_argument("--json", type=Path, metavar="PATH", help="also write the JSON record here")
    cp.add_argument("--force", action="store_true", help=_FORCE_HELP)
    cp.add_argument("--wide", action="store_true", help=_WIDE_HELP)
    cp.add_argument("--report-dir", type=Path, metavar="DIR", help="default reports/compare-<UTC time>-<commit>/")

    rp = sub.add_parser("report", help="render the reports (Markdown, HTML, JUnit, terminal) of a run record again; "
                                       "the exit code is the record's verdict")
    rp.add_argument("record", type=Path, metavar="RECORD",
                    help="a run record: 'run --json FILE', or a report folder's report.json")
    rp.add_argument("--report-dir", type=Path, metavar="DIR",
                    help="write report.{json,md,html} and junit.xml here (default: print only)")
    rp.add_argument("--wide", action="store_true", help=_WIDE_HELP)

    h = sub.add_parser("history", help="per-stage error across commits from many run records: a SQLite file "
                                       "(appended to) and one HTML page marking where each stage's error jumped")
    h.add_argument("records", type=Path, nargs="+", metavar="PATH",
                   help="run records (.json) or folders searched for them (e.g. reports/)")
    h.add_argument("--db", type=Path, default=Path("reports/history.sqlite"), metavar="FILE",
                   help="the SQLite file the records are added to (default reports/history.sqlite)")
    h.add_argument("--out", type=Path, default=Path("reports/history.html"), metavar="FILE",
                   help="the HTML page (default reports/history.html)")
    h.add_argument("--factor", type=float, default=10.0, metavar="F",
                   help="a jump: a stage's error grew more than F times over the previous run of the same "
                        "settings, or it went from pass to fail (default 10)")

    d = sub.add_parser("debug", help="debuggers: 'debug precision' (which modules to keep in full precision)")
    dsub = d.add_subparsers(dest="debugger", required=True, parser_class=_Parser)
    dp = dsub.add_parser("precision", help="find a small set of modules to keep in full precision so that the "
                                           "quantized port's logits meet a target (against the unquantized port)")
    dp.add_argument("--quantize", choices=("mxfp8",), required=True)
    goal = dp.add_mutually_exclusive_group()
    goal.add_argument("--target-kl", type=float, metavar="X",
                      help="the mean KL divergence over every position to meet (default 1e-3)")
    goal.add_argument("--target-top1", type=float, metavar="Y",
                      help="the fraction of positions whose top token agrees, to meet (0 to 1)")
    dp.add_argument("--model", type=Path, metavar="DIR", help="default: the first fixture model that supports it")
    dp.add_argument("--image", action="append", type=Path, metavar="PATH", help="(repeatable) default: the battery")
    dp.add_argument("--case", action="append", metavar="GLOB",
                    help="the scenarios measured (repeatable; default: text-only and image/gradient)")
    _family_options(dp)
    dp.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    dp.add_argument("--report-dir", type=Path, metavar="DIR",
                    help="precision.json (the table) and keep.json (for convert --keep); default "
                         "reports/precision-<UTC time>-<commit>/")

    f = sub.add_parser("fixtures", help="regenerate the embedded default under fixtures/, or write a synthetic "
                                        "checkpoint of the real shapes (--shape)")
    f.add_argument("--out", type=Path, default=None, help="default: the repository's fixtures/ (required with --shape)")
    f.add_argument("--shape", choices=("12b", "mini"), default=None,
                   help="write a sharded HF checkpoint of the first family's real 12B shapes (or 'mini': the "
                        "same structure at toy sizes) with random weights, one shard in memory at a time")
    f.add_argument("--layers", type=int, default=None, metavar="N", help="with --shape: decoder layers (12b: 48)")
    f.add_argument("--weights-dtype", choices=("bfloat16", "float32"), default="bfloat16",
                   help="with --shape: the stored dtype (default bfloat16)")
    return p


def _family_options(parser) -> None:
    """The registered families' own settings (``parity.adapter.Option``) as flags of ``parser``."""
    from parity.adapter import options

    for opt in options().values():
        parser.add_argument(opt.flag, dest=opt.name, type=opt.type, choices=opt.choices, default=opt.default,
                            help=opt.help)


def _option_args(args) -> dict:
    from parity.adapter import options

    return {name: getattr(args, name) for name in options()}


def _settings(args):
    from parity.runner import Settings

    return Settings.of(mode=args.mode, dtype=args.dtype, stages=tuple(args.stages or ()),
                       attn_implementation=args.attn_implementation, inject=tuple(args.inject) + _env_inject(),
                       oracle=not args.no_oracle, decode_steps=args.decode_steps, quantize=args.quantize,
                       shard=args.shard, stream=args.stream, threads=args.threads,
                       tol_overrides=tuple(args.tol or ()), **_option_args(args))


def _check_outputs(args, *folders: Path | None) -> None:
    """Every output place is usable before the run, not after minutes of work: each folder new (or
    empty), not a symlink, under a writable folder; the folders and the files (--json, --baseline)
    distinct and not inside one another."""
    from parity import report
    from rmlx.errors import InputError

    places = [f for f in folders if f is not None]
    outputs = (getattr(args, "json", None), getattr(args, "baseline", None) if getattr(args, "update_baseline", False)
               else None)
    files = [p for p in outputs if p is not None]
    for folder in places:
        if folder.is_symlink():
            raise InputError(f"{folder}: is a symlink; give a real folder for outputs")
        report.check_free(folder)
        _writable_parent(folder)
    for path in files:
        if path.is_dir() or path.is_symlink() and not path.exists():
            raise InputError(f"{path}: cannot write a file there (a folder, or a dangling symlink)")
        _writable_parent(path)
    js = getattr(args, "json", None)
    if js is not None and js.exists() and not getattr(args, "force", False):
        raise InputError(f"--json {js}: already exists; pass --force to replace it")
    resolved = [(p, p.resolve()) for p in (*places, *files)]
    for i, (a, ra) in enumerate(resolved):
        for b, rb in resolved[i + 1:]:
            if ra == rb or ra in rb.parents or rb in ra.parents:
                raise InputError(f"{a} and {b}: two outputs in the same place; give each its own")


def _writable_parent(path: Path) -> None:
    """The nearest existing ancestor of ``path`` is a folder this process can write into."""
    from rmlx.errors import InputError

    parent = path.absolute().parent
    while not parent.exists() and not parent.is_symlink():
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(f"{path}: cannot write there ({parent} is not a folder)")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"{path}: cannot write there ({parent} is not writable)")


def _run(args) -> tuple[dict, Path, dict | None]:
    """Run the cases the options name: (record, report folder, dumps); nothing written yet."""
    from parity import report
    from parity.runner import dealt, default_scenarios, record, run_cases, runnable
    from parity.stages import matches_any
    from rmlx.errors import InputError

    settings = _settings(args)
    models = args.model or default_models()
    images = args.image or default_images()
    if not models or not images:
        raise Untestable(f"no fixture models or images under {fixtures_dir()}")
    if not args.model:  # the embedded default: fixture models whose family cannot run these settings sit out
        models, skipped = runnable(models, settings)
        for m, why in skipped.items():
            print(f"rmlx-parity: note: {m.name} skipped: {why}", file=sys.stderr)
        if not models:
            raise InputError("no fixture model's family can run these settings")
    scenarios = default_scenarios(images, None if args.image else fixtures_dir() / "images", models)
    if args.case:
        scenarios = [s for s in scenarios if matches_any(s.name, args.case)]
        if not scenarios:
            raise InputError(f"--case {' '.join(args.case)} matches no scenario")
    report_dir = args.report_dir or default_report_dir()
    _check_outputs(args, report_dir, args.dump)
    from parity.jobs import resolve
    from parity.kernels import KernelCheck

    t0 = time.perf_counter()
    check = KernelCheck()
    jobs = resolve(args.jobs, models, settings.stream, len(models) * len(scenarios))
    results = run_cases(models, scenarios, settings, keep_captures=args.dump is not None,
                        progress=report.Progress(), kernel_check=check, jobs=jobs)
    rec = record(results, settings, time.perf_counter() - t0, args.run_id, argv=args.argv, kernels=check.summary(),
                 jobs=dealt(jobs, settings, len(results)))
    dumps = None
    if args.dump:  # the selected stages (--stages) and every input the dump's reader checks
        def kept(capture):  # a streamed run's parity.dumps.Spool holds the selected stages already
            if hasattr(capture, "finish"):
                return capture
            return {k: v for k, v in (capture or {}).items()
                    if not args.stages or k.startswith("input.") or matches_any(k, args.stages)}
        dumps = {r.name: {"reference": kept(r.reference), "candidate": kept(r.candidate)} for r in results}
    return rec, report_dir, dumps


REPORTS = Path("reports")


def default_report_dir(kind: str = "") -> Path:
    """``reports/<kind><UTC time>-<commit>/`` (``-dirty`` for uncommitted changes, ``no-git`` outside a
    work tree; ``-2``, ``-3``... when a run in the same second took the name)."""
    from parity.provenance import git

    g = git()
    commit = "no-git" if g["commit"] is None else g["commit"][:10] + ("-dirty" if g["dirty"] else "")
    base = f"{kind}{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{commit}"
    n = 1
    while (REPORTS / (base if n == 1 else f"{base}-{n}")).exists():
        n += 1
    return REPORTS / (base if n == 1 else f"{base}-{n}")


def _point_latest(report_dir: Path) -> None:
    """``reports/latest`` -> the report folder just published (a symlink, replaced atomically; a
    ``latest`` that is not a symlink is left alone, with a warning)."""
    latest = report_dir.parent / "latest"
    if latest.exists() and not latest.is_symlink():
        print(f"rmlx-parity: warning: {latest} is not a symlink; not pointed at {report_dir.name}", file=sys.stderr)
        return
    tmp = latest.with_name(f".latest.rmlx-{os.getpid()}-{os.urandom(2).hex()}")
    try:
        tmp.symlink_to(report_dir.name, target_is_directory=True)
        os.replace(tmp, latest)
    except OSError as e:  # a file system without symlinks: the folder itself is published all the same
        tmp.unlink(missing_ok=True)
        print(f"rmlx-parity: warning: {latest} not updated ({e.strerror or e})", file=sys.stderr)


def _write_outputs(rec: dict, report_dir: Path | None, args, dumps: dict | None = None,
                   folder: dict[str, str] | None = None, files: dict[Path, str] | None = None) -> None:
    """Write every output of a command together: the report folder (a run's reports and dumps, or
    ``folder``: {file name: text}; none when ``report_dir`` is None), ``--json`` and ``files`` (a
    baseline) are staged first and renamed into place at the end, so a failure leaves none of them."""
    from parity import report
    from parity.atomic import staged_files
    from rmlx.errors import InputError

    texts = dict(files or {})
    if getattr(args, "json", None):
        texts[args.json] = report.json_text(rec)
    try:
        with staged_files(texts):
            if report_dir is None:
                pass
            elif folder is None:
                report.write_report_dir(report_dir, rec, dumps, getattr(args, "dump", None))
            else:
                report.write_files(report_dir, folder)
    except OSError as e:  # a full disk, a folder that became read-only: one line, nothing published
        raise InputError(f"cannot write the outputs ({e.strerror or e}: {e.filename or report_dir}); "
                         "nothing was published") from None


def _publish(rec: dict, report_dir: Path, args, dumps: dict | None = None, folder: dict[str, str] | None = None,
             files: dict[Path, str] | None = None) -> None:
    """:func:`_write_outputs`, then ``reports/latest`` for a default report folder, and the folder's
    Markdown to the CI job summary when ``$GITHUB_STEP_SUMMARY`` names one (a warning on stderr if it
    cannot)."""
    from parity import report

    _write_outputs(rec, report_dir, args, dumps, folder, files)
    if getattr(args, "report_dir", None) is None:
        _point_latest(report_dir)
    summary = os.environ.get("GITHUB_STEP_SUMMARY")
    if summary:
        markdown = next((t for n, t in (folder or {}).items() if n.endswith(".md")), None) or report.to_markdown(rec)
        try:
            with open(summary, "a", encoding="utf-8", errors="backslashreplace") as f:
                f.write(markdown)
        except OSError as e:
            print(f"rmlx-parity: warning: GITHUB_STEP_SUMMARY={summary}: not written ({e.strerror or e})",
                  file=sys.stderr)


def _env_inject() -> tuple[str, ...]:
    """Defects named in ``$RMLX_INJECT`` (comma-separated): planted in every run, as ``--inject`` would."""
    return tuple(n.strip() for n in os.environ.get("RMLX_INJECT", "").split(",") if n.strip())


def _no_injected_faults(what: str) -> None:
    from rmlx.errors import InputError

    if _env_inject():
        raise InputError(f"RMLX_INJECT={','.join(sorted(_env_inject()))} is set: {what} needs the port as it "
                         "is; unset it")


def cmd_run(args) -> int:
    from parity import report

    rec, report_dir, dumps = _run(args)
    _publish(rec, report_dir, args, dumps)
    print(report.to_terminal(rec, wide=args.wide, notes=[f"report: {report_dir / 'report.md'}"
                                                          + (f"; dumps: {args.dump}" if args.dump else "")]))
    return _exit(rec)


def _exit(rec: dict) -> int:
    """0 pass, 1 the port fails (a crash of the port included), 125 the reference or harness raised."""
    if rec.get("untestable"):
        print(f"rmlx-parity: cannot test: the reference or the harness raised in {len(rec['untestable'])} "
              f"case(s), first {rec['untestable'][0]} (see its error in the report)", file=sys.stderr)
        return EXIT_UNTESTABLE
    return EXIT_PASS if rec["passed"] else EXIT_FAIL


def cmd_gate(args) -> int:

    from parity import gate, report

    gate.check_drift(args.drift_ratio, args.drift_floor, args.cross_machine_ratio)
    if args.record is not None:
        return _gate_record(args)
    if args.update_baseline:
        _no_injected_faults("recording a baseline")
    else:  # a bad baseline, or one of other settings, fails before the run
        baseline = gate.load(args.baseline)
        settings = _settings(args)
        gate.check_settings(settings.to_record(), baseline, str(args.baseline))
    rec, report_dir, dumps = _run(args)
    if args.update_baseline:
        baseline_text = {args.baseline: report.json_text(gate.from_record(rec))} if rec["passed"] else {}
        _publish(rec, report_dir, args, dumps, files=baseline_text)
        print(report.to_terminal(rec, wide=args.wide, notes=[f"report: {report_dir / 'report.md'}"]))
        if not rec["passed"]:
            print(f"\nbaseline {args.baseline} NOT written: the run fails parity", file=sys.stderr)
            return EXIT_FAIL
        print(f"\nbaseline written: {args.baseline} ({len(rec['cases'])} cases)")
        return EXIT_PASS
    rec["gate"] = gate.check(rec, baseline, args.drift_ratio, args.drift_floor, str(args.baseline),
                             args.cross_machine_ratio)
    _publish(rec, report_dir, args, dumps)
    print(report.to_terminal(rec, wide=args.wide, notes=[f"report: {report_dir / 'report.md'}"]))
    print("\n" + gate.summary(rec["gate"]))  # last: the gate's verdict is this command's
    return EXIT_PASS if rec["gate"]["passed"] else EXIT_FAIL


def _gate_record(args) -> int:
    """``gate --record FILE``: gate a recorded run against the baseline, without running anything."""
    from parity import gate
    from rmlx.errors import InputError

    if args.update_baseline:
        raise InputError("--record and --update-baseline: record a baseline from a run, not from a file")
    rec = gate.load_record(args.record)
    baseline = gate.load(args.baseline)
    _check_outputs(args, args.report_dir)
    rec["gate"] = gate.check(rec, baseline, args.drift_ratio, args.drift_floor, str(args.baseline),
                             args.cross_machine_ratio)
    if args.report_dir is not None or args.json is not None:
        _publish_record(rec, args)
    print(gate.summary(rec["gate"]))
    return EXIT_PASS if rec["gate"]["passed"] else EXIT_FAIL


def _publish_record(rec: dict, args) -> None:
    """A record's outputs without a default report folder: --report-dir and --json, when given."""
    folder = None
    if args.report_dir is not None and "compare" in rec:
        from parity import compare

        folder = compare.report_files(rec)
    _write_outputs(rec, args.report_dir, args, folder=folder)


def cmd_report(args) -> int:
    """Render a run record's reports again (a core install can: numpy, Pillow)."""
    from parity import gate, report

    rec = gate.load_record(args.record)
    _check_outputs(args, args.report_dir)
    if args.report_dir is not None:
        _publish_record(rec, args)
    notes = [] if args.report_dir is None else [f"report: {args.report_dir / 'report.md'}"]
    if "compare" in rec:
        from parity import compare

        print(compare.to_terminal(rec, wide=args.wide, notes=notes))
    else:
        print(report.to_terminal(rec, wide=args.wide, notes=notes))
    return _exit(rec)


def cmd_history(args) -> int:
    """Informational: exit 0 whatever the history shows (``gate`` is the command that fails)."""
    from parity import history
    from rmlx.errors import InputError

    for p in args.records:
        if not p.exists():
            raise InputError(f"{p}: no such file or folder")
    print(history.summary(history.history(list(args.records), args.db, args.out, factor=args.factor)))
    return EXIT_PASS


def cmd_selftest(args) -> int:
    from parity import report, selftest

    _no_injected_faults("the self-test")
    models = args.model or default_models()
    images = fixtures_dir() / "images"
    if not models or not images.is_dir():
        raise Untestable(f"no fixture models or images under {fixtures_dir()}")
    report_dir = args.report_dir or default_report_dir("selftest-")
    _check_outputs(args, report_dir)
    modes = ("teacher", "free") if args.mode == "both" else (args.mode,)
    from parity.jobs import resolve

    rec = selftest.run_selftest(models, images, args.fault, modes, progress=report.Progress(),
                                jobs=resolve(args.jobs, models, False))
    rec["command"] = " ".join(["rmlx-parity", *args.argv])
    _publish(rec, report_dir, args, folder={"selftest.json": report.json_text(rec),
                                            "selftest.md": selftest.to_markdown(rec)})
    print(selftest.to_terminal(rec, notes=[f"report: {report_dir / 'selftest.md'}"]))
    return EXIT_PASS if rec["passed"] else EXIT_FAIL


def cmd_stages(args) -> int:
    from parity.adapter import family_of
    from parity.stages import select

    model = args.model or (default_models() or [None])[0]
    if model is None:
        print(f"rmlx-parity: cannot test: no fixture model under {fixtures_dir()}", file=sys.stderr)
        return EXIT_UNTESTABLE
    for s in select(args.stages, family_of(model).stage_table(model)):
        print(f"{s.name:<26} {s.tol:<11} {s.port:<52} {s.what}")
    return EXIT_PASS


def cmd_faults(args) -> int:
    from parity.adapter import families

    for kind, fam in families().items():
        for f in fam.defects.values():
            print(f"{kind:<15} {f.name:<28} -> {f.stage:<26} {f.imitates}")
    return EXIT_PASS


def cmd_debug(args) -> int:
    """``debug precision``: the search of ``parity.precision`` on one checkpoint (exit 0 when the
    target is met, 1 when even the chosen set misses it)."""
    from parity import precision, report
    from parity.adapter import family_of
    from parity.runner import Settings, default_scenarios
    from parity.stages import matches_any
    from rmlx.errors import InputError
    from rmlx.imagefile import load_image

    model = args.model or next(iter(default_models()), None)
    if model is None:
        raise Untestable(f"no fixture model under {fixtures_dir()}")
    if args.target_top1 is not None and not 0 <= args.target_top1 <= 1:
        raise InputError(f"--target-top1 {args.target_top1}: must be between 0 and 1")
    if args.target_kl is not None and not args.target_kl >= 0:
        raise InputError(f"--target-kl {args.target_kl}: must be >= 0")
    target_kl = 1e-3 if args.target_kl is None and args.target_top1 is None else args.target_kl
    settings = Settings.of(dtype=args.dtype, oracle=False, decode_steps=0, **_option_args(args))
    fam = family_of(model)
    fam.check_settings(settings)
    images = args.image or default_images()
    scenarios = default_scenarios(images, None if args.image else fixtures_dir() / "images", [model])
    globs = args.case or ["text-only", "image/gradient"]
    scenarios = [s for s in scenarios if matches_any(s.name, globs) and fam.supports(model, s)]
    if not scenarios:
        raise InputError(f"--case {' '.join(globs)} matches no scenario {model.name} supports")
    report_dir = args.report_dir or default_report_dir("precision-")
    _check_outputs(args, report_dir)
    adapter = fam.load(model, settings)
    decoded = {p: load_image(p) for s in scenarios for p in s.images}
    cases = [(s, adapter.inputs(s, decoded, settings)[0]) for s in scenarios]
    rec = precision.search(adapter, cases, decoded, settings, args.quantize, target_kl, args.target_top1,
                           progress=report.Progress())
    rec["command"] = " ".join(["rmlx-parity", *args.argv])
    _publish(rec, report_dir, args, folder={"precision.json": report.json_text(rec),
                                            "keep.json": report.json_text(precision.keep_file(rec))})
    print(precision.to_terminal(rec))
    print(f"\nkeep: {report_dir / 'keep.json'} (rmlx-parity convert --quantize {args.quantize} --keep FILE SRC DST)")
    return EXIT_PASS if rec["met"] else EXIT_FAIL


def cmd_convert(args) -> int:
    from parity import report
    from parity.adapter import family_of
    from parity.atomic import staged

    family = family_of(args.src)  # the checkpoint's model_type names the family that can convert it
    keep = []
    if args.keep is not None:
        from parity.precision import read_keep

        keep = read_keep(args.keep, args.quantize)
    report.check_free(args.dst)
    with staged(args.dst, before_rename=report.check_free) as (tmp,):
        status = family.convert(args.src, tmp, args.quantize, keep)
    done = sum(s == "quantized" for s in status.values())
    print(f"wrote {args.dst}: {done} of {len(status)} quantizable linears in {args.quantize}")
    for path, s in status.items():
        if s != "quantized":
            print(f"  {path}: {s}")
    return EXIT_PASS


def cmd_compare(args) -> int:
    from parity import compare

    run_id = args.run_id
    report_dir = args.report_dir or default_report_dir("compare-")
    _check_outputs(args, report_dir)
    rec = compare.compare_paths(args.ref, args.cand, args.dtype, args.mode, args.stages, run_id, argv=args.argv,
                                require_all=args.require_all, overrides=tuple(args.tol or ()))
    files = compare.report_files(rec)
    _publish(rec, report_dir, args, folder=files)
    for warning in rec["compare"]["warnings"]:
        print(f"rmlx-parity: warning: {warning}", file=sys.stderr)
    print(compare.to_terminal(rec, wide=args.wide, notes=[f"report: {report_dir / 'report.md'}"]))
    return EXIT_PASS if rec["passed"] else EXIT_FAIL


FIXTURE_PARTS = ("models", "images")


def check_ours(out: Path) -> None:
    """``fixtures --out DIR`` replaces DIR's models/, images/ and MANIFEST.json only when DIR has none
    of them or its MANIFEST.json was written by this command: nothing else is ever replaced."""
    from reference.fixtures import MANIFEST
    from rmlx.errors import InputError

    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: is not a folder")
    present = [p for p in (*FIXTURE_PARTS, MANIFEST) if (out / p).exists() or (out / p).is_symlink()]
    if not present:
        return
    try:
        ours = str(json.loads((out / MANIFEST).read_text()).get("generator", "")).startswith("rmlx-parity fixtures")
    except (OSError, ValueError, AttributeError, RecursionError):
        ours = False
    if not ours:
        raise InputError(f"{out}: holds {', '.join(present)} but no {MANIFEST} written by `rmlx-parity fixtures`; "
                         "refusing to replace them (choose a new or empty folder)")


def cmd_fixtures(args) -> int:
    from parity import report
    from parity.atomic import scratch, staged
    from reference.fixtures import MANIFEST, generate
    from rmlx.errors import InputError

    if args.shape is not None:
        import reference.synthetic as synthetic

        if args.out is None:
            raise InputError("--shape needs --out DIR (a new folder)")
        if args.layers is not None and args.layers < 1:
            raise InputError(f"--layers must be >= 1, got {args.layers}")
        report.check_free(args.out)
        t0 = time.perf_counter()
        with staged(args.out, before_rename=report.check_free) as (tmp,):
            index = synthetic.write(tmp, args.shape, args.layers, args.weights_dtype, progress=report.Progress())
        shards = len(set(index["weight_map"].values()))
        print(f"wrote {args.out}: {args.shape}-shaped, {len(index['weight_map'])} tensors, "
              f"{index['metadata']['total_size'] / 2**30:.2f} GiB in {shards} shards, {time.perf_counter() - t0:.1f} s")
        return EXIT_PASS
    if args.layers is not None:
        raise InputError("--layers needs --shape")
    out = args.out or fixtures_dir()
    check_ours(out)
    with scratch(out, "fixtures") as tmp:
        manifest = generate(tmp)
        for part in (*FIXTURE_PARTS, MANIFEST):  # each old part moves into tmp (removed with it), the new one in
            if (out / part).exists() or (out / part).is_symlink():
                os.replace(out / part, tmp / f"old-{part}")
            os.replace(tmp / part, out / part)
    print(f"wrote {len(manifest['files'])} files under {out} (see {out / 'MANIFEST.json'})")
    return EXIT_PASS


# the modules each command imports before it starts (the port and harness for the gating commands)
_NEEDS = {"run": ("parity.runner",), "gate": ("parity.gate", "parity.runner"), "selftest": ("parity.selftest",),
          "compare": ("parity.compare",), "stages": ("parity.stages",),
          "faults": ("parity.adapter",), "convert": ("parity.adapter",),
          "fixtures": ("reference.fixtures",), "report": ("parity.report", "parity.gate"),
          "debug": ("parity.precision", "parity.runner"),
          "history": ("parity.history",)}
# the extras each command needs beyond the core install (numpy, safetensors, ml_dtypes, Pillow), and the
# modules that tell whether an extra is installed
_EXTRAS = {"run": ("mlx", "reference"), "gate": ("mlx", "reference"), "selftest": ("mlx", "reference"),
           "stages": ("mlx", "reference"), "faults": ("mlx", "reference"), "fixtures": ("mlx", "reference"),
           "convert": ("mlx",), "debug": ("mlx", "reference")}
_EXTRA_MODULES = {"mlx": ("mlx",), "reference": ("torch", "torchvision", "transformers")}


def missing_extras(args) -> str | None:
    """One line naming the extras a command needs and this environment lacks (None: all present)."""
    import importlib.util

    if args.command == "gate" and args.record is not None:  # gating a record needs the core only
        return None
    absent = {extra: [m for m in _EXTRA_MODULES[extra] if importlib.util.find_spec(m) is None]
              for extra in _EXTRAS.get(args.command, ())}
    absent = {e: ms for e, ms in absent.items() if ms}
    if not absent:
        return None
    modules = ", ".join(m for ms in absent.values() for m in ms)
    return (f"'rmlx-parity {args.command}' needs the [{','.join(absent)}] extra ({modules} not installed): "
            "pip install 'rmlx[all]' (CPU-only torch: see docs/usage.md)")


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM: unwinds like Ctrl-C, so every ``finally`` removes its temporary files."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def main(argv: list[str] | None = None) -> int:
    """``rmlx-parity``: the exit code of the command (0 pass, 1 fail, 2 bad input, 125 cannot test,
    130 interrupted by SIGINT / Ctrl-C, 143 by SIGTERM: one line, no temporary file left, and no
    output half-written)."""
    main_thread = threading.current_thread() is threading.main_thread()
    caught = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, _interrupt) for s in caught} if main_thread else {}
    try:
        return _main(argv)
    except KeyboardInterrupt as e:  # the staging folders are gone already (finally blocks)
        signum = getattr(e, "signum", signal.SIGINT)
        print(f"rmlx-parity: interrupted by {signal.Signals(signum).name}; temporary files removed, no output "
              "half-written", file=sys.stderr)
        return EXIT_TERMINATED if signum == signal.SIGTERM else EXIT_INTERRUPTED
    except BrokenPipeError:
        if not _reader_gone(sys.stdout):
            raise  # another pipe (a worker's): a real error
        # stdout's reader is gone (`rmlx-parity ... | head`): the rest of the output has no reader
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush is quiet
        return EXIT_BROKEN_PIPE
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _reader_gone(stream) -> bool:
    """True when ``stream`` is a pipe whose reading end is closed (poll reports an error on it)."""
    import select

    try:
        poll = select.poll()
        poll.register(stream.fileno(), select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poll.poll(0))
    except (AttributeError, OSError, ValueError):  # no poll (Windows), no file descriptor
        return False


def _interrupt(signum, frame) -> None:
    """The first SIGINT or SIGTERM raises :class:`Interrupted`; the ones after it are ignored, so the
    clean-up it starts runs to the end."""
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)
    raise Interrupted(signum)


def check_environment() -> str | None:
    """One line naming an environment variable with a value rmlx does not know (None: all known)."""
    blas = os.environ.get("RMLX_BLAS")
    if blas not in (None, "", "auto", "reference"):
        return f"RMLX_BLAS={blas!r} is not 'auto' or 'reference'"
    for name in SWITCHES:
        value = os.environ.get(name)
        if value not in (None, "", "0", "1"):
            return f"{name}={value!r} is not '0' or '1' (1: MLX's own; unset or 0: rmlx's)"
    return None


def _output_folders(args) -> list[Path]:
    """The folders a command writes its temporary siblings into (where a killed run left them)."""
    places = []
    for name in ("report_dir", "dump", "json", "dst", "db", "out"):
        p = getattr(args, name, None)
        if isinstance(p, Path):
            places.append(p.parent)
    if getattr(args, "update_baseline", False):
        places.append(args.baseline.parent)
    if args.command == "fixtures":  # fixtures stages inside its --out folder
        places.append(args.out or fixtures_dir())
    if args.command in ("run", "gate", "selftest", "compare", "debug") and getattr(args, "report_dir", None) is None:
        places.append(REPORTS)
    return places


def sweep_stale(args, started: float) -> None:
    """Remove the temporaries of killed rmlx runs (``.NAME.rmlx-PID-XXXX`` of a process that no longer
    runs, older than this one) from every folder this command writes into."""
    from parity.atomic import sweep

    for folder in dict.fromkeys(_output_folders(args)):
        try:
            sweep(folder, before=started)
        except (OSError, ValueError):  # an odd path: the command itself says what is wrong with it
            continue


def _main(argv: list[str] | None) -> int:
    started = time.time()
    bad_env = check_environment()
    if bad_env:
        print(f"rmlx-parity: error: {bad_env}", file=sys.stderr)
        return EXIT_BAD_INPUT
    argv = sys.argv[1:] if argv is None else list(argv)
    try:  # the families' options are flags: the parser imports the registry, which a broken revision fails
        parser = build_parser()
    except Exception as e:  # ImportError, SyntaxError, anything raised at import time
        print(f"rmlx-parity: cannot test this revision: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_UNTESTABLE
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # bad usage (2) or --help (0): a return code, like every other outcome
        return int(e.code or 0)
    args.argv = argv
    args.run_id = time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + f"-{os.getpid()}-{os.urandom(2).hex()}"
    try:  # import what the command needs up front: a revision that cannot is skipped, not failed
        from rmlx.errors import InputError
    except Exception as e:  # ImportError, SyntaxError, anything raised at import time
        print(f"rmlx-parity: cannot test this revision: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_UNTESTABLE
    missing = missing_extras(args)
    if missing:
        print(f"rmlx-parity: error: {missing}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        for module in ("parity.report", *_NEEDS[args.command]):
            importlib.import_module(module)
    except InputError as e:  # e.g. an unknown fault in RMLX_INJECT, read at import: bad input, not untestable
        print(f"rmlx-parity: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as e:
        print(f"rmlx-parity: cannot test this revision: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_UNTESTABLE
    sweep_stale(args, started)
    commands = {"run": cmd_run, "gate": cmd_gate, "selftest": cmd_selftest, "stages": cmd_stages,
                "faults": cmd_faults, "fixtures": cmd_fixtures, "convert": cmd_convert, "compare": cmd_compare,
                "report": cmd_report, "history": cmd_history, "debug": cmd_debug}
    try:
        return commands[args.command](args)
    except InputError as e:  # one line, whatever file name or key the message quotes
        from rmlx.files import one_line

        print(f"rmlx-parity: error: {one_line(str(e))}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Untestable as e:
        print(f"rmlx-parity: cannot test this revision: {e}", file=sys.stderr)
        return EXIT_UNTESTABLE


if __name__ == "__main__":
    sys.exit(main())
