"""`git bisect run rmlx-parity gate ...` names the commit that introduced a numeric defect.

A throwaway history is built from this checkout's own code: a good base, harmless commits, a commit
that breaks the import of the port (exit 125: bisect skips it), its fix, the commit that plants a real
defect in the source (not through the fault switch: LayerNorm eps 1e-5 -> 1e-6 in
``rmlx/models/gemma4_unified/vision.py``), and more harmless commits. The baseline is recorded at the base
with ``--update-baseline``.
"""

import os
import re
import shutil
import subprocess
import sys

import pytest

from tests.conftest import FIXTURES, ROOT

GATE = [sys.executable, "-m", "parity.cli", "gate", "--model", "fixtures/models/tiny", "--case", "image/gradient",
        "--no-oracle", "--decode-steps", "1"]


def git(repo, *args) -> str:
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@t")
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True,
                          env=env).stdout.strip()


def commit(repo, message) -> str:
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", message)
    return git(repo, "rev-parse", "HEAD")


def edit(path, old, new):
    text = path.read_text()
    assert text.count(old) == 1, (path, old)
    path.write_text(text.replace(old, new))


@pytest.fixture(scope="module")
def history(tmp_path_factory):
    if shutil.which("git") is None:
        pytest.fail("git is required for the bisect test")
    repo = tmp_path_factory.mktemp("bisect") / "repo"
    for pkg in ("rmlx", "parity", "reference"):
        shutil.copytree(ROOT / pkg, repo / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(FIXTURES / "models" / "tiny", repo / "fixtures" / "models" / "tiny")
    (repo / "fixtures" / "images").mkdir()
    shutil.copy(FIXTURES / "images" / "gradient.png", repo / "fixtures" / "images")
    (repo / ".gitignore").write_text("reports/\n__pycache__/\n")
    (repo / "NOTES.md").write_text("history\n")
    git(repo, "init", "-q", "-b", "main")
    shas = {"base": commit(repo, "base: the port matches")}
    for i in range(2):
        (repo / "NOTES.md").write_text(f"history {i}\n")
        shas[f"doc{i}"] = commit(repo, f"docs {i}")
    errors = repo / "rmlx" / "errors.py"
    edit(errors, "class InputError", "class InputError(\n")  # a syntax error: the port cannot be imported
    shas["broken"] = commit(repo, "refactor errors (breaks the import)")
    edit(errors, "class InputError(\n", "class InputError")
    shas["fixed"] = commit(repo, "fix the import")
    edit(repo / "rmlx" / "models" / "gemma4_unified" / "vision.py", "LAYER_NORM_EPS = 1e-5", "LAYER_NORM_EPS = 1e-6")
    shas["defect"] = commit(repo, "vision: share the eps constant (plants the defect)")
    for i in range(2, 4):
        (repo / "NOTES.md").write_text(f"history {i}\n")
        shas[f"doc{i}"] = commit(repo, f"docs {i}")
    return repo, shas


def run_gate(repo, baseline, *extra):
    env = dict(os.environ, PYTHONPATH=str(repo), RMLX_FIXTURES=str(repo / "fixtures"))
    return subprocess.run([*GATE, "--baseline", str(baseline), *extra], cwd=repo, capture_output=True, text=True,
                          env=env)


@pytest.fixture(scope="module")
def baseline(history, tmp_path_factory):
    """Recorded at the good base, as a user would: the same gate command with --update-baseline."""
    repo, shas = history
    path = tmp_path_factory.mktemp("baseline") / "baseline.json"
    git(repo, "checkout", "-q", shas["base"])
    try:
        proc = run_gate(repo, path, "--update-baseline")
    finally:
        git(repo, "checkout", "-q", "main")
    assert proc.returncode == 0 and path.is_file(), proc.stdout[-2000:] + proc.stderr[-2000:]
    return path


def test_an_unimportable_revision_is_untestable(history, baseline):
    repo, shas = history
    git(repo, "checkout", "-q", shas["broken"])
    try:
        proc = run_gate(repo, baseline)
    finally:
        git(repo, "checkout", "-q", "main")
    assert proc.returncode == 125 and "cannot test this revision: SyntaxError" in proc.stderr, proc.stderr


def test_git_bisect_run_names_the_commit(history, baseline):
    repo, shas = history
    git(repo, "bisect", "start", "main", shas["base"])
    try:
        env = dict(os.environ, PYTHONPATH=str(repo), RMLX_FIXTURES=str(repo / "fixtures"))
        proc = subprocess.run(["git", "-C", str(repo), "bisect", "run", *GATE, "--baseline", str(baseline)],
                              cwd=repo, capture_output=True, text=True, env=env)
    finally:
        log = git(repo, "bisect", "log")
        git(repo, "bisect", "reset")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    found = re.search(r"^([0-9a-f]{40}) is the first bad commit", proc.stdout, re.M)
    assert found and found.group(1) == shas["defect"], proc.stdout[-3000:]
    assert "plants the defect" in proc.stdout
    assert "First regression: vision.patch_ln1" in proc.stdout  # the gate names the stage at the bad commit
    assert shas["broken"] not in re.findall(r"# bad: \[([0-9a-f]+)\]", log)  # skipped or passed, never blamed
