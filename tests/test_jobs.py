"""`rmlx-parity run --jobs N` (parity/jobs.py): cases dealt to worker processes give the record one
process gives -- every case in plan order, every metric, the kernel checks -- and a worker that dies
costs time, not cases."""

import json
import os
import signal

import pytest

from parity import jobs
from parity.cli import main
from parity.runner import Settings, run_cases
from tests.conftest import ALL_MODELS, FIXTURES

CASES = ["--case", "image/gradient", "--case", "text-only", "--case", "two-images", "--decode-steps", "2"]
TIMINGS = {"seconds", "wall_time_s", "created", "run_id", "command", "jobs"}


def _strip(x):
    """A record without its timings and identity (what differs between two runs of the same cases)."""
    if isinstance(x, dict):
        return {k: _strip(v) for k, v in x.items() if k not in TIMINGS}
    if isinstance(x, list):
        return [_strip(v) for v in x]
    return x


def _run(tmp_path, name: str, *extra: str) -> tuple[int, dict]:
    code = main(["run", *CASES, *extra, "--report-dir", str(tmp_path / name),
                 "--json", str(tmp_path / f"{name}.json")])
    return code, json.loads((tmp_path / f"{name}.json").read_text())


def test_dealt_cases_give_the_record_of_one_process(tmp_path):
    """Both families, 2 processes against 1, in bf16: the candidate's products then go through
    rmlx.nn.kernels, so the kernel checks of both processes are merged too."""
    models = ["--model", str(FIXTURES / "models" / "tiny"), "--model", str(FIXTURES / "models" / "gemma4-tiny")]
    one_code, one = _run(tmp_path, "one", "--dtype", "bfloat16", "--jobs", "1", *models)
    two_code, two = _run(tmp_path, "two", "--dtype", "bfloat16", "--jobs", "2", *models)
    assert (one["jobs"], two["jobs"]) == (1, 2)
    assert one_code == two_code
    assert [c["name"] for c in two["cases"]] == [c["name"] for c in one["cases"]]
    assert {c["model"] for c in one["cases"]} == {"tiny", "gemma4-tiny"} and len(one["cases"]) == 6
    assert one["kernels"]["checks"], "a bf16 run checks the kernels that computed the candidate"
    assert _strip(two) == _strip(one)


def test_a_worker_that_dies_costs_time_not_cases(tmp_path, capsys):
    """The worker is killed as the first case here begins: its cases run in this process."""
    import multiprocessing

    models = [m for m in ALL_MODELS if m.name in ("tiny", "gemma4-tiny")]
    from parity.runner import default_scenarios

    scenarios = [s for s in default_scenarios([FIXTURES / "images" / "gradient.png"], FIXTURES / "images", models)
                 if s.name in ("image/gradient", "text-only", "text-4")]
    settings = Settings.of(decode_steps=1)
    killed = []

    def progress(done, total, label):
        for child in multiprocessing.active_children():
            if child.name == "rmlx-parity worker" and not killed:
                os.kill(child.pid, signal.SIGKILL)
                killed.append(child.pid)

    dealt = run_cases(models, scenarios, settings, progress=progress, jobs=2)
    assert killed
    assert "a worker process ended early (exit code -9)" in capsys.readouterr().err
    alone = run_cases(models, scenarios, settings, jobs=1)
    assert [r.name for r in dealt] == [r.name for r in alone]
    assert [[d.to_dict() for d in r.diffs] for r in dealt] == [[d.to_dict() for d in r.diffs] for r in alone]


def test_auto_deals_small_checkpoints_only(tmp_path):
    cores = len(os.sched_getaffinity(0))
    assert jobs.auto_jobs(ALL_MODELS, stream=False) == max(1, min(cores, jobs.MAX_AUTO))
    assert jobs.auto_jobs(ALL_MODELS, stream=True) == 1
    assert jobs.auto_jobs(ALL_MODELS, stream=False, cases=jobs.AUTO_CASES * 2 - 1) == 1  # too few to pay a start-up
    assert jobs.auto_jobs(ALL_MODELS, stream=False, cases=1000) == max(1, min(cores, jobs.MAX_AUTO))
    big = tmp_path / "big"
    big.mkdir()
    with open(big / "model.safetensors", "wb") as f:  # sparse: the size auto reads, no disk used
        f.truncate(jobs.AUTO_BYTES + 1)
    assert jobs.auto_jobs([big], stream=False) == 1


@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5"])
def test_a_bad_jobs_value_is_one_line_and_exit_2(value, capsys):
    assert main(["run", "--jobs", value]) == 2
    err = capsys.readouterr().err
    assert f"argument --jobs: expected a whole number >= 1 or 'auto', got {value!r}" in err
    assert len(err.strip().splitlines()) == 1


def test_a_dealt_selftest_has_the_outcomes_of_one_process(tmp_path):
    """The self-test's runs dealt to 2 processes (each computing the references it needs): the same outcomes."""
    argv = ["selftest", "--model", str(FIXTURES / "models" / "gemma4-tiny"), "--fault", "g4-rescale-256",
            "--fault", "g4-rope-axes-swapped", "--fault", "g4-standardize-skipped"]
    records = []
    for n in ("1", "2"):
        assert main([*argv, "--jobs", n, "--json", str(tmp_path / f"{n}.json"), "--report-dir", str(tmp_path / n)]) == 0
        records.append(json.loads((tmp_path / f"{n}.json").read_text()))
    one, two = (_strip(r["outcomes"]) for r in records)
    assert len(one) == 8 and two == one  # the clean port and 3 defects, both modes
