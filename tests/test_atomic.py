"""parity.atomic: outputs appear whole or not at all; a killed writer's leftovers are swept."""

import json
import os
import subprocess
import sys

import pytest

from parity.atomic import scratch, staged, sweep, write_text
from parity.cli import main
from tests.conftest import FIXTURES


def test_a_failed_block_publishes_nothing_and_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError), staged(tmp_path / "a", tmp_path / "b") as (a, b):
        (a / "x").write_text("1")
        (b / "y").write_text("2")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_a_refused_destination_publishes_none_of_them(tmp_path):
    def refuse(final):
        if final.name == "b":
            raise ValueError(f"{final}: taken")

    with pytest.raises(ValueError, match="taken"), staged(tmp_path / "a", tmp_path / "b",
                                                         before_rename=refuse) as (a, b):
        (a / "x").write_text("1")
    assert list(tmp_path.iterdir()) == []


def test_write_text_replaces_whole_with_ordinary_permissions(tmp_path):
    path = tmp_path / "sub" / "r.json"
    write_text(path, "one")
    write_text(path, b"two")
    assert path.read_text() == "two" and [p.name for p in path.parent.iterdir()] == ["r.json"]
    assert path.stat().st_mode & 0o777 == 0o666 & ~_umask()


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


def test_a_killed_writers_leftovers_are_swept_and_a_live_ones_kept(tmp_path):
    code = ("import os, sys; from pathlib import Path; from parity.atomic import staged\n"
            "with staged(Path(sys.argv[1]) / 'report') as (t,):\n"
            "    (t / 'half').write_text('x'); os._exit(9)\n")  # dies mid-write: no cleanup runs
    assert subprocess.run([sys.executable, "-c", code, str(tmp_path)]).returncode == 9
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(".report.rmlx-")
    with scratch(tmp_path, "mine") as live:
        assert sweep(tmp_path) == [] and live.exists()  # our own temporary folder is never swept
        assert not (tmp_path / left[0]).exists()  # the dead writer's went when scratch() swept


def test_fixtures_refuses_a_folder_it_did_not_write(tmp_path, capsys):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "precious").write_text("keep me")
    assert main(["fixtures", "--out", str(tmp_path)]) == 2
    assert "refusing to replace" in capsys.readouterr().err
    assert (tmp_path / "models" / "precious").read_text() == "keep me"
    (tmp_path / "MANIFEST.json").write_text(json.dumps({"generator": "someone else"}))
    assert main(["fixtures", "--out", str(tmp_path)]) == 2
    assert (tmp_path / "models" / "precious").read_text() == "keep me"


def test_sigterm_mid_run_publishes_nothing_and_leaves_no_temporary_folder(tmp_path):
    import signal
    import time

    out = tmp_path / "reports"
    proc = subprocess.Popen([sys.executable, "-m", "parity.cli", "run", "--report-dir", str(out / "r")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    time.sleep(12)  # mid-run: the models are loaded, cases are running
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert not out.exists() or list(out.iterdir()) == []  # no report, no .r.rmlx-* folder


def _run_args(tmp_path, *extra):
    return ["run", "--model", str(FIXTURES / "models" / "tiny"), "--case", "text-4", "--no-oracle", *extra]


def test_outputs_in_the_same_place_are_refused_before_the_run(tmp_path, capsys):
    rep = tmp_path / "rep"
    for extra in (["--report-dir", str(rep), "--dump", str(rep)], ["--report-dir", str(rep), "--dump", str(rep / "d")],
                  ["--report-dir", str(rep), "--json", str(rep / "r.json")]):
        assert main(_run_args(tmp_path, *extra)) == 2
        assert "same place" in capsys.readouterr().err
    assert not rep.exists()


def test_an_unwritable_or_odd_output_place_is_refused_before_the_run(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    for extra, message in ((["--report-dir", str(tmp_path / "afile" / "r")], "is not a folder"),
                           (["--report-dir", str(tmp_path / "dangling")], "symlink"),
                           (["--report-dir", str(tmp_path / "r"), "--json", str(tmp_path / "dangling")], "dangling")):
        assert main(_run_args(tmp_path, *extra)) == 2
        assert message in capsys.readouterr().err


def test_an_empty_existing_report_folder_is_filled_not_replaced(tmp_path):
    rep = tmp_path / "mnt"
    rep.mkdir()
    inode = rep.stat().st_ino
    assert main(_run_args(tmp_path, "--report-dir", str(rep))) == 0
    assert rep.stat().st_ino == inode and (rep / "report.md").is_file()  # a mount point would still be mounted


def test_a_job_summary_that_cannot_be_written_is_a_warning(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(tmp_path / "no" / "such" / "summary.md"))
    assert main(_run_args(tmp_path, "--report-dir", str(tmp_path / "r"))) == 0
    assert "warning: GITHUB_STEP_SUMMARY" in capsys.readouterr().err


def test_a_failed_publish_leaves_neither_the_json_nor_the_reports(tmp_path, capsys, monkeypatch):
    from parity import report

    def broken(*a, **k):
        raise OSError(28, "No space left on device", str(tmp_path / "r"))

    monkeypatch.setattr(report.html, "to_html", broken)
    assert main(_run_args(tmp_path, "--report-dir", str(tmp_path / "r"), "--json", str(tmp_path / "r.json"))) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == []

