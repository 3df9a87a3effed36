"""nox sessions: tests (the default pytest run), slow (tests marked slow), lint (ruff), coverage (which
lines and branches of rmlx/ the default `rmlx-parity run` executes; docs/coverage.md), parity (the
self-test, the gates against the committed baselines, and the embedded default in every policy, dtype
and mode, and quantized), bench (benchmarks/bench.py: JSON + Markdown under reports/), wheel (a
non-editable install runs the quick start), core (the core install: compare, gate --record, report), fuzz
(tests/test_fuzz.py with the long Hypothesis profile)."""

import shutil

import nox

nox.options.sessions = ["tests", "lint"]
PYTHON = "3.11"
# the supported Pythons this machine has (requires-python >= 3.11): the tests session runs on each
PYTHONS = [v for v in ("3.11", "3.12", "3.13") if shutil.which(f"python{v}")] or [PYTHON]


@nox.session(python=PYTHONS)
def tests(session):
    session.install("-e", ".[dev]")
    session.run("python", "-m", "pytest", *session.posargs)


@nox.session(python=PYTHON)
def slow(session):
    session.install("-e", ".[dev]")
    session.run("python", "-m", "pytest", "-m", "slow", *session.posargs, success_codes=[0, 5])


@nox.session(python=PYTHON)
def lint(session):
    session.install("ruff")
    session.run("ruff", "check", "rmlx", "reference", "parity", "tests", "benchmarks", "noxfile.py")


@nox.session(python=PYTHON)
def sweep(session):
    """The configuration sweep of tests/test_config_sweep.py with 200 drawn configurations."""
    session.install("-e", ".[dev]")
    session.run("python", "-m", "pytest", "-n", "0", "tests/test_config_sweep.py", env={"RMLX_SWEEP_EXAMPLES": "200"})


@nox.session(python=PYTHON)
def fuzz(session):
    """The parser fuzz suite (tests/test_fuzz.py) under its fuzz-long profile: 20 times the examples of
    the default run, with Hypothesis's statistics (docs/reliability.md)."""
    session.install("-e", ".[dev]")
    session.run("python", "-m", "pytest", "-n", "0", "tests/test_fuzz.py", "--hypothesis-show-statistics",
                "--durations=0", *session.posargs, env={"RMLX_FUZZ_PROFILE": "fuzz-long"})


@nox.session(python=PYTHON)
def coverage(session):
    session.install("-e", ".[dev]")
    out = session.create_tmp()
    session.run("coverage", "erase")
    # one process: coverage traces this one, not the workers --jobs would start
    session.run("coverage", "run", "-m", "parity.cli", "run", "--jobs", "1", "--report-dir", f"{out}/coverage-run",
                "--json", f"{out}/coverage-run.json", silent=True)
    session.run("coverage", "report")


@nox.session(python=PYTHON)
def parity(session):
    session.install("-e", ".[dev]")
    session.run("rmlx-parity", "selftest")
    session.run("rmlx-parity", "gate", "--baseline", "fixtures/baselines/float32-free.json")
    session.run("rmlx-parity", "gate", "--baseline", "fixtures/baselines/float32-teacher.json", "--mode", "teacher")
    session.run("rmlx-parity", "gate", "--baseline", "fixtures/baselines/mxfp8-free.json", "--quantize", "mxfp8")
    for policy in ("official", "hf-forward"):
        for dtype in ("float32", "bfloat16"):
            for mode in ("free", "teacher"):
                session.run("rmlx-parity", "run", "--dtype", dtype, "--mode", mode, "--mask-policy", policy)
    session.run("rmlx-parity", "run", "--quantize", "mxfp8")


@nox.session(python=PYTHON)
def bench(session):
    session.install("-e", ".[dev]")
    session.run("python", "benchmarks/bench.py", *session.posargs)


@nox.session(python=PYTHON)
def wheel(session):
    """`pip install '.[all]'` (not editable) and the embedded default from outside the repository: the
    fixtures come from the installed package `rmlx_fixtures`."""
    session.install(".[all]")
    out = session.create_tmp()
    session.chdir(out)
    session.run("rmlx-parity", "run", "--report-dir", "wheel-run", *session.posargs)


@nox.session(python=PYTHON)
def core(session):
    """The core install alone (no mlx, torch or transformers): .ci/core-install."""
    session.run("bash", ".ci/core-install", session.create_tmp(), external=True)
