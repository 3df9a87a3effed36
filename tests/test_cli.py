"""The command line as a user meets it: every command and flag the README and docs/usage.md mention
exists, --version, no abbreviations, --tol, --json refusing to overwrite, report folders named by
time and commit with reports/latest, `report` and `gate --record` on a recorded run, and the one line
that names a missing extra."""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from parity.cli import build_parser, main
from tests.conftest import FIXTURES

ROOT = Path(__file__).resolve().parents[1]
TINY = FIXTURES / "models" / "tiny"
RECORD = FIXTURES / "recorded" / "tiny-text-4.json"
BASELINE = FIXTURES / "baselines" / "float32-free.json"
ONE = ["--model", str(TINY), "--case", "text-4", "--no-oracle", "--decode-steps", "1"]


def _help_words() -> dict[str, set[str]]:
    """{command: the options its --help lists}; "" holds the commands."""
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    out = {"": set(sub.choices)}

    def options(p) -> set[str]:  # a command with its own subcommands (debug precision): theirs too
        found = {s for a in p._actions for s in a.option_strings}
        for a in p._actions:
            if a.__class__.__name__ == "_SubParsersAction":
                found |= set(a.choices) | {s for c in a.choices.values() for s in options(c)}
        return found

    for name, p in sub.choices.items():
        out[name] = options(p)
    return out


def _mentioned(text: str) -> list[tuple[str, list[str]]]:
    """Every `rmlx-parity COMMAND --flag ...` in a document's code: (command, its flags)."""
    found = []
    for line in re.findall(r"rmlx-parity (?=[a-z])[^\n`|]*", text):
        words = shlex.split(line.replace("\\", ""), posix=True, comments=True) if line.count("'") % 2 == 0 else []
        if len(words) < 2 or words[1].startswith("-"):
            continue
        found.append((words[1], [w.split("=")[0] for w in words[2:] if w.startswith("--")]))
    return found


@pytest.mark.parametrize("doc", ["README.md", "docs/usage.md"])
def test_every_command_and_flag_the_docs_mention_exists(doc):
    words = _help_words()
    mentioned = _mentioned((ROOT / doc).read_text())
    assert mentioned, f"{doc} mentions no rmlx-parity command"
    for command, flags in mentioned:
        if command.startswith("<") or command in ("COMMAND", "..."):
            continue
        assert command in words[""], f"{doc}: 'rmlx-parity {command}' is not a command"
        unknown = [f for f in flags if f not in words[command]]
        assert not unknown, f"{doc}: 'rmlx-parity {command}' has no option {unknown}"


def test_version_names_the_package(capsys):
    assert main(["--version"]) == 0
    out = capsys.readouterr().out
    assert re.fullmatch(r"rmlx-parity \S+ \(transformers 5\.24\.0, torch 2\.14\.1\S*, mlx \S+, numpy \S+\)\n", out), out


def test_abbreviations_are_errors(capsys):
    assert main(["run", "--decode-step", "1"]) == 2
    assert "unrecognized arguments: --decode-step" in capsys.readouterr().err


@pytest.mark.parametrize("text,why", [("layers.*.out", "expected STAGE_GLOB=ATOL"), ("logits=abc", "numbers"),
                                      ("logits=-1", ">= 0"), ("logits=1,2,3", "expected STAGE_GLOB"),
                                      ("=1e-3", "expected STAGE_GLOB"), ("logits=nan", "finite")])
def test_bad_tol_is_a_usage_error(text, why, capsys):
    assert main(["run", "--tol", text]) == 2
    err = capsys.readouterr().err
    assert "--tol" in err and why in err


def test_tol_override_applies_to_matching_stages_and_is_recorded(tmp_path):
    out = tmp_path / "r.json"
    code = main(["run", *ONE, "--tol", "layers.*.out=1e-12", "--tol", "layers.3.out=1,0.5",
                 "--json", str(out), "--report-dir", str(tmp_path / "rep")])
    rec = json.loads(out.read_text())
    assert code == 1 and not rec["passed"]
    stages = {s["name"]: s for s in rec["cases"][0]["stages"]}
    # the first glob tightens every layer output; the later one, more specific, loosens layers.3.out again
    assert stages["layers.0.out"]["tolerance"] == {"rtol": 1.3e-06, "atol": 1e-12}
    assert not stages["layers.0.out"]["passed"]
    assert stages["layers.3.out"]["tolerance"] == {"rtol": 0.5, "atol": 1.0} and stages["layers.3.out"]["passed"]
    assert stages["layers.0.attn.out"]["tolerance"]["atol"] == 2e-3  # whole components: not matched
    assert rec["first_divergence"]["stage"] == "layers.0.out"
    assert rec["settings"]["tol_overrides"] == [{"stages": "layers.*.out", "atol": 1e-12, "rtol": None},
                                                {"stages": "layers.3.out", "atol": 1.0, "rtol": 0.5}]


def test_json_is_not_overwritten_without_force(tmp_path, capsys):
    out = tmp_path / "r.json"
    out.write_text("precious")
    assert main(["run", *ONE, "--json", str(out), "--report-dir", str(tmp_path / "a")]) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    assert out.read_text() == "precious" and not (tmp_path / "a").exists()
    assert main(["run", *ONE, "--json", str(out), "--force", "--report-dir", str(tmp_path / "b")]) == 0
    assert json.loads(out.read_text())["passed"] is True


def test_default_report_folder_is_time_and_commit_and_latest_points_at_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["run", *ONE]) == 0
    assert main(["run", *ONE]) == 0
    folders = sorted(p for p in (tmp_path / "reports").iterdir() if p.name != "latest")
    assert len(folders) == 2
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout[:10]
    for f in folders:
        assert re.fullmatch(rf"\d{{8}}T\d{{6}}Z-{commit}(-dirty)?(-\d+)?", f.name), f.name
        assert (f / "report.json").is_file()
    latest = tmp_path / "reports" / "latest"
    assert latest.is_symlink() and latest.resolve() == max(folders, key=lambda p: p.stat().st_mtime).resolve()
    rec = json.loads((latest / "report.json").read_text())
    assert rec["git"]["commit"].startswith(commit)


def test_report_renders_a_record_and_exits_with_its_verdict(tmp_path, capsys):
    assert main(["report", str(RECORD), "--report-dir", str(tmp_path / "r")]) == 0
    lines = capsys.readouterr().out.rstrip().splitlines()
    assert lines[-1].startswith("rmlx parity PASS") and f"report: {tmp_path / 'r' / 'report.md'}" in lines
    assert {p.name for p in (tmp_path / "r").iterdir()} == {"report.json", "report.md", "report.html", "junit.xml"}
    assert json.loads((tmp_path / "r" / "report.json").read_text()) == json.loads(RECORD.read_text())
    failing = json.loads(RECORD.read_text())
    failing["passed"], failing["cases"][0]["passed"] = False, False
    (tmp_path / "f.json").write_text(json.dumps(failing))
    assert main(["report", str(tmp_path / "f.json")]) == 1


@pytest.mark.parametrize("content,names", [("{", "not readable JSON"), ('{"schema": "rmlx.selftest/1"}', "schema"),
                                           ('{"schema": "rmlx.parity/2", "settings": []}', "'settings'")])
def test_report_and_gate_refuse_a_bad_record(tmp_path, capsys, content, names):
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    for argv in (["report", str(bad)], ["gate", "--record", str(bad), "--baseline", str(BASELINE)]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert str(bad) in err and names in err


def test_gate_record_gates_without_running(tmp_path, capsys):
    assert main(["gate", "--record", str(RECORD), "--baseline", str(BASELINE)]) == 0
    assert "gate PASS" in capsys.readouterr().out
    worse = json.loads(RECORD.read_text())
    worse["cases"][0]["stages"][-1]["max_abs"] = 1.0  # an error far past its baseline
    (tmp_path / "w.json").write_text(json.dumps(worse))
    assert main(["gate", "--record", str(tmp_path / "w.json"), "--baseline", str(BASELINE)]) == 1
    assert "gate FAIL" in capsys.readouterr().out


def _without(modules: list[str], argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Run the CLI in a process where ``modules`` are not installed (they cannot be found or imported)."""
    code = ("import importlib.abc, sys\n"
            f"HIDDEN = {modules!r}\n"
            "class Hide(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] in HIDDEN:\n"
            "            raise ModuleNotFoundError(name, name=name)\n"
            "sys.meta_path.insert(0, Hide())\n"
            "import importlib.util\n"
            "real = importlib.util.find_spec\n"
            "importlib.util.find_spec = lambda n, *a: None if n.split('.')[0] in HIDDEN else real(n, *a)\n"
            "from parity.cli import main\n"
            f"sys.exit(main({argv!r}))\n")
    env = {k: v for k, v in os.environ.items() if k != "RMLX_INJECT"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=cwd, env=env)


def test_a_missing_extra_is_one_line_naming_it(tmp_path):
    p = _without(["torch", "torchvision", "transformers"], ["run"], tmp_path)
    assert p.returncode == 2, p.stderr
    assert p.stderr.strip() == ("rmlx-parity: error: 'rmlx-parity run' needs the [reference] extra (torch, "
                                "torchvision, transformers not installed): pip install 'rmlx[all]' (CPU-only "
                                "torch: see docs/usage.md)")
    p = _without(["mlx"], ["convert", "--quantize", "mxfp8", str(TINY), str(tmp_path / "q")], tmp_path)
    assert p.returncode == 2 and "needs the [mlx] extra (mlx not installed)" in p.stderr


def test_compare_report_and_gate_need_no_mlx_torch_or_transformers(tmp_path):
    hidden = ["mlx", "torch", "torchvision", "transformers"]
    dumps = FIXTURES / "recorded" / "vision-causal"
    p = _without(hidden, ["compare", str(dumps), "--json", "c.json", "--report-dir", "c"], tmp_path)
    assert p.returncode == 1, p.stderr  # the planted defect: a parity failure, named
    rec = json.loads((tmp_path / "c.json").read_text())
    assert rec["first_divergence"]["stage"].startswith("mask.")
    assert {"mlx", "torch", "transformers", "numpy"} <= set(rec["versions"])
    assert _without(hidden, ["report", str(RECORD), "--report-dir", "r"], tmp_path).returncode == 0
    assert _without(hidden, ["gate", "--record", str(RECORD), "--baseline", str(BASELINE)], tmp_path).returncode == 0


def test_output_into_a_closed_pipe_is_exit_141_without_a_traceback():
    """`rmlx-parity ... | head -1`: once the reader is gone the command stops quietly, as a shell tool
    killed by SIGPIPE does (128 + 13), instead of printing a BrokenPipeError traceback."""
    read, write = os.pipe()
    os.close(read)
    try:
        p = subprocess.run([sys.executable, "-m", "parity.cli", "gate", "--baseline", str(BASELINE), "--record",
                            str(RECORD)], stdout=write, stderr=subprocess.PIPE, text=True, cwd=ROOT, timeout=120)
    finally:
        os.close(write)
    assert (p.returncode, p.stderr) == (141, "")
