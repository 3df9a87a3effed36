"""`--shard K/N`: N deterministic slices of the case list that together run every case exactly once
(for CI matrix jobs), each gated against the same committed baseline."""

import json

import pytest

from parity.cli import default_images, fixtures_dir, main
from parity.runner import default_scenarios, plan_cases
from rmlx.errors import InputError
from tests.conftest import FIXTURES, MODELS


def full_plan():
    return plan_cases(MODELS, default_scenarios(default_images(), fixtures_dir() / "images"))


@pytest.mark.parametrize("n", [1, 2, 3, 7, 45])
def test_shards_partition_the_cases(n):
    full = full_plan()
    shards = [plan_cases(MODELS, default_scenarios(default_images(), fixtures_dir() / "images"), (k, n))
              for k in range(1, n + 1)]
    names = [[f"{m.name}/{s.name}" for m, s in shard] for shard in shards]
    flat = [x for shard in names for x in shard]
    assert sorted(flat) == sorted(f"{m.name}/{s.name}" for m, s in full) and len(set(flat)) == len(full)
    assert max(map(len, names)) - min(map(len, names)) <= 1  # balanced
    again = plan_cases(MODELS, default_scenarios(default_images(), fixtures_dir() / "images"), (1, n))
    assert [(m, s.name) for m, s in again] == [(m, s.name) for m, s in shards[0]]  # deterministic


def test_too_many_shards_is_bad_input():
    scenarios = default_scenarios(default_images(), fixtures_dir() / "images")
    n = len(plan_cases(MODELS, scenarios))
    with pytest.raises(InputError, match=f"only {n} cases"):
        plan_cases(MODELS, scenarios, (1, n + 1))


@pytest.mark.parametrize("spec", ["0/3", "4/3", "3", "a/b", "1/0"])
def test_bad_shard_spec_is_exit_2(spec, capsys):
    assert main(["run", "--shard", spec]) == 2
    assert "--shard" in capsys.readouterr().err


def test_a_shard_runs_and_gates_its_cases(tmp_path):
    solids = "image/solid-*"
    code = main(["gate", "--baseline", str(FIXTURES / "baselines" / "float32-free.json"), "--model", str(MODELS[0]),
                 "--case", solids, "--shard", "2/3", "--no-oracle", "--report-dir", str(tmp_path / "rep"),
                 "--json", str(tmp_path / "r.json")])
    rec = json.loads((tmp_path / "r.json").read_text())
    scenarios = [s for s in default_scenarios(default_images(), fixtures_dir() / "images") if s.name.startswith(
        "image/solid-")]
    expected = [f"{MODELS[0].name}/{s.name}" for s in scenarios][1::3]
    assert code == 0 and [c["name"] for c in rec["cases"]] == expected and rec["settings"]["shard"] == "2/3"
    assert rec["gate"]["passed"]
