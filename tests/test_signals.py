"""Interrupted and killed runs, on real ``rmlx-parity run`` subprocesses.

SIGINT exits 130 and SIGTERM 143, each with one line and no temporary file left, whether the signal
arrives while the cases run or while the outputs are published. A run killed with SIGKILL while it
publishes leaves its temporaries (``.NAME.rmlx-PID-XXXX``); the next command sweeps them when it
starts and succeeds.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from parity.cli import main

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
TINY = FIXTURES / "models" / "tiny"
EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143}

# a real run held at one point, the models loaded: after its first case ("cases") or inside its
# publication, at the HTML page ("publish"; the staging folders and the staged --json file exist then).
# There it writes the marker file, then signals itself (SIGINT, SIGTERM) or waits for the test ("wait").
HOLD = textwrap.dedent("""
    import os, signal, sys, time
    from pathlib import Path
    from parity import cli, runner
    from parity.report import html

    marker, action, where, argv = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]

    def hold():
        Path(marker).write_text(str(os.getpid()))
        if action != "wait":
            os.kill(os.getpid(), getattr(signal, action))
        time.sleep(60)

    if where == "cases":
        first_case = runner.run_case
        def run_case(*args, **kwargs):
            result = first_case(*args, **kwargs)
            hold()
            return result
        runner.run_case = run_case
    else:
        html.to_html = lambda rec: hold()
    sys.exit(cli.main(argv))
""")


def _held(tmp_path: Path, action: str, where: str, argv: list[str], **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "held"), action, where, *argv],
                            cwd=tmp_path, text=True, **kwargs)


def _wait_for(marker: Path, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + 300
    while not marker.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the run did not reach the point held"
        time.sleep(0.05)


def _outputs(parent: Path) -> list[str]:
    return ["--report-dir", str(parent / "rep"), "--dump", str(parent / "dump"), "--json", str(parent / "r.json")]


def _run_argv(*extra: str, case: str = "text-*") -> list[str]:
    return ["run", "--model", str(TINY), "--case", case, "--no-oracle", *extra]


def _one_interrupt_line(err: str, signum: int) -> None:
    lines = [line for line in err.splitlines() if "interrupted" in line]
    assert len(lines) == 1 and signal.Signals(signum).name in lines[0], err
    assert "Traceback" not in err, err


SLOW = pytest.mark.slow  # the other signal of each phase: `nox -s slow` (the default run keeps one of each)
SIGNALS_CASES = pytest.mark.parametrize("signum", [signal.SIGINT, pytest.param(signal.SIGTERM, marks=SLOW)],
                                        ids=["SIGINT", "SIGTERM"])
SIGNALS_PUBLISH = pytest.mark.parametrize("signum", [pytest.param(signal.SIGINT, marks=SLOW), signal.SIGTERM],
                                          ids=["SIGINT", "SIGTERM"])


@SIGNALS_CASES
def test_a_signal_while_the_cases_run(tmp_path, signum):
    """The run signals itself once its first case is done (the models loaded, seven cases to go)."""
    out = tmp_path / "out"
    (tmp_path / "tmp").mkdir()
    proc = _held(tmp_path, signal.Signals(signum).name, "cases", _run_argv(*_outputs(out)),
                 env={**os.environ, "TMPDIR": str(tmp_path / "tmp")}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, err = proc.communicate(timeout=300)
    assert (tmp_path / "held").exists(), err
    assert proc.returncode == EXIT[signum], err
    _one_interrupt_line(err, signum)
    assert not out.exists() or sorted(os.listdir(out)) == [], sorted(os.listdir(out))
    # no temporary file of rmlx's (the libraries' caches, mlx/ and torchinductor_*/, are theirs to keep)
    assert [n for n in os.listdir(tmp_path / "tmp") if n.startswith("tmp")] == []


@SIGNALS_PUBLISH
def test_a_signal_from_outside_while_the_outputs_are_published(tmp_path, signum):
    """The test sends the signal while the run is inside its publication: the staging folders of the
    report and the dumps and the staged --json file exist at that moment, and none is left."""
    out = tmp_path / "out"
    proc = _held(tmp_path, "wait", "publish", _run_argv(*_outputs(out), case="text-4"), stdout=subprocess.PIPE,
                 stderr=subprocess.PIPE)
    _wait_for(tmp_path / "held", proc)
    assert len(os.listdir(out)) == 3, sorted(os.listdir(out))  # .rep.rmlx-*, .dump.rmlx-*, .r.json.rmlx-*
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT[signum], err
    _one_interrupt_line(err, signum)
    assert sorted(os.listdir(out)) == [], sorted(os.listdir(out))


def test_a_run_killed_while_publishing_is_swept_by_the_next(tmp_path):
    out = tmp_path / "out"
    proc = _held(tmp_path, "wait", "publish", _run_argv(*_outputs(out), case="text-4"),
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for(tmp_path / "held", proc)
    proc.kill()  # SIGKILL: no clean-up runs
    proc.wait(timeout=60)
    left = sorted(os.listdir(out))
    assert len(left) == 3 and all(n.startswith((".rep.rmlx-", ".dump.rmlx-", ".r.json.rmlx-")) for n in left), left

    second = subprocess.run([sys.executable, "-m", "parity.cli", *_run_argv(*_outputs(out), case="text-4")],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    assert sorted(os.listdir(out)) == ["dump", "r.json", "rep"]
    assert json.loads((out / "r.json").read_text())["passed"] is True


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_temporaries_are_swept_at_start_even_when_the_run_is_then_refused(tmp_path, capsys):
    """The sweep is the first thing a command does: a run refused for bad input still leaves the
    folders it would write into clean. Only temporaries of dead processes that are older than the
    run go; a live process's and a newer one stay."""
    out = tmp_path / "out"
    out.mkdir()
    old = time.time() - 3600
    dead = _dead_pid()
    stale = [out / f".rep.rmlx-{dead}-abcd1234", out / f".r.json.rmlx-{dead}-x9y8z7"]
    stale[0].mkdir()
    (stale[0] / "report.md").write_text("half")
    stale[1].write_text("{")
    live = out / f".rep.rmlx-{os.getppid()}-live0000"
    live.mkdir()
    for p in (*stale, live):
        os.utime(p, (old, old))
    newer = out / f".rep.rmlx-{dead}-newer000"
    newer.mkdir()
    os.utime(newer, (time.time() + 3600, time.time() + 3600))  # written after this run started
    assert main(_run_argv(*_outputs(out), case="no-such-case")) == 2
    assert "no-such-case" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == sorted([live.name, newer.name])
