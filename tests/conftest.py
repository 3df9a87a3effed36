"""Shared fixtures and Hypothesis profiles.

Profiles, chosen by ``HYPOTHESIS_PROFILE`` (or ``CI=true`` for ``ci``): ``ci`` is fixed
(derandomized, 50 examples, the reproduction blob printed); ``dev`` (the local default) draws 100
fresh examples a run; ``long`` draws 1000 (``HYPOTHESIS_PROFILE=long python -m pytest tests/test_masks.py``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

import rmlx  # noqa: F401  (before any test module imports mlx: the BLAS MLX calls is loaded first, rmlx/blas.py)

settings.register_profile("dev", deadline=None, max_examples=100)
settings.register_profile("long", deadline=None, max_examples=1000)
settings.register_profile("ci", deadline=None, derandomize=True, print_blob=True, max_examples=50,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "fixtures"
ALL_MODELS = sorted(p for p in (FIXTURES / "models").iterdir() if (p / "config.json").is_file())


def _model_type(p: Path) -> str:
    return json.loads((p / "config.json").read_text()).get("model_type", "")


def _gemma4_geometry(p: Path) -> bool:
    """Gemma 4's own 48 px cells (16 px patches pooled 3x3) and an audio-or-not config of the battery."""
    v = json.loads((p / "config.json").read_text()).get("vision_config") or {}
    return (v.get("patch_size"), v.get("pooling_kernel_size")) == (16, 3) and p.name.startswith("tiny")


# the gemma4_unified fixture models of Gemma 4's geometry (what most tests mean by "every fixture
# model": tiny, tiny-variant), the ones that exercise configuration (hf-test-config, config-defaults:
# docs/configuration.md), and the gemma4 ones
UNIFIED_MODELS = [p for p in ALL_MODELS if _model_type(p) == "gemma4_unified"]
MODELS = [p for p in UNIFIED_MODELS if _gemma4_geometry(p)]
CONFIG_MODELS = [p for p in UNIFIED_MODELS if p not in MODELS]
GEMMA4_MODELS = [p for p in ALL_MODELS if _model_type(p) == "gemma4"]


IMAGES = sorted((FIXTURES / "images").glob("*.png"))


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES


@pytest.fixture(scope="session", params=MODELS, ids=[m.name for m in MODELS])
def model_dir(request) -> Path:
    return request.param


@pytest.fixture(scope="session")
def default_runs(tmp_path_factory):
    """``default_runs(dtype, mode, policy)`` -> (exit code, record, folder): one `rmlx-parity run` of the
    embedded default per combination per session, shared by every test that reads it (a minute each)."""
    from parity.cli import main

    done: dict[tuple, tuple] = {}

    def get(dtype: str, mode: str, policy: str):
        key = (dtype, mode, policy)
        if key not in done:
            out = tmp_path_factory.mktemp(f"run-{dtype}-{mode}-{policy}")
            code = main(["run", "--dtype", dtype, "--mode", mode, "--mask-policy", policy,
                         "--report-dir", str(out / "rep"), "--json", str(out / "record.json")])
            done[key] = (code, json.loads((out / "record.json").read_text()), out)
        return done[key]

    return get


@pytest.fixture(scope="session")
def adapters():
    """One Gemma4UnifiedAdapter per fixture model (HF + rmlx loaded once per session)."""
    from parity.adapters.gemma4_unified.adapter import Gemma4UnifiedAdapter

    cache = {}

    def get(model: Path, dtype: str = "float32"):
        key = (model, dtype)
        if key not in cache:
            cache[key] = Gemma4UnifiedAdapter(model, dtype)
        return cache[key]

    return get


# one process per run: pytest-xdist keeps every core busy already (tests/test_jobs.py deals cases to two);
# and OpenMP threads that wait passively, so that one worker's spinning threads do not take the core the
# other computes on (parity/jobs.py; set before torch loads the OpenMP runtime, at collection)
SESSION = {"RMLX_PARITY_JOBS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
THREAD_POOLS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
# glibc's malloc keeps freed memory up to these sizes instead of returning it to the kernel, which
# then faults the pages in again for the next array (a default run: 870 K page faults, 6.4 s of system
# time in 58.6 s; with these 3.1 s in 54.1 s, docs/development.md)
MALLOC = {"MALLOC_MMAP_THRESHOLD_": str(256 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 30),
          "MALLOC_TOP_PAD_": str(64 << 20)}


def pytest_configure(config):
    """The environment of the processes that run the tests, set in the controller before it starts
    them (the workers and the subprocesses the tests start inherit it; a value the user set wins):
    ``SESSION`` always.

    Under pytest-xdist (``-n N``), also: each worker's BLAS and OpenMP pools get the cores divided by
    the workers (at least one), so that N workers do not run N x cores threads on the cores; and glibc's
    malloc keeps freed memory (``MALLOC``). Neither changes what a test checks: every process of a
    session computes with the same pools."""
    env = dict(SESSION)
    workers = getattr(config.option, "numprocesses", None)
    if isinstance(workers, int) and workers > 1 and not os.environ.get("PYTEST_XDIST_WORKER"):
        threads = str(max(1, len(os.sched_getaffinity(0)) // workers))
        env |= {var: threads for var in THREAD_POOLS} | MALLOC
    for var, value in env.items():
        os.environ.setdefault(var, value)


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups into the node ids
def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (``-n``, set in pyproject's addopts) with ``--dist loadgroup``: every test that
    reads a session's default runs lands on one worker, so each default run is computed once; the
    module-scoped self-test and quantized runs likewise stay whole. The other tests spread freely."""
    for item in items:
        if "default_runs" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("default-runs"))
        elif item.module.__name__.rsplit(".", 1)[-1] in ("test_selftest", "test_quant", "test_html", "test_junit"):
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))
