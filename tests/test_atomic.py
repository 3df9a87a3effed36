"""parity.atomic: outputs appear whole or not at all; a killed writer's leftovers are swept."""

import json
import os
import subprocess
import sys
from pathlib import Path

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
    from parity.report import html  # (a submodule: imported here, whatever ran before)

    def broken(*a, **k):
        raise OSError(28, "No space left on device", str(tmp_path / "r"))

    monkeypatch.setattr(html, "to_html", broken)
    assert main(_run_args(tmp_path, "--report-dir", str(tmp_path / "r"), "--json", str(tmp_path / "r.json"))) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == []



def _fsize_limited(limit: int):
    """A preexec_fn: the child may write no file past ``limit`` bytes (a full disk, as ``ulimit -f``
    makes one), and SIGXFSZ is ignored so that the write fails with EFBIG instead of killing it."""
    import resource
    import signal

    def limit_writes():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return limit_writes


@pytest.mark.parametrize("outputs,limit,culprit", [
    # the reports and --json (< 45 kB each) fit, a dump (386 kB) does not: safetensors' own writer fails
    (("--report-dir", "rep", "--json", "r.json", "--dump", "dump"), 100_000, "dump/tiny__text-only"),
    # the other writers (`nox -s slow`): the staged --json (34 kB) first, then report.json (34 kB)
    pytest.param(("--report-dir", "rep", "--json", "r.json"), 20_000, "r.json", marks=pytest.mark.slow),
    pytest.param(("--report-dir", "rep"), 20_000, "rep", marks=pytest.mark.slow),
], ids=["dump", "json", "reports"])
def test_a_full_disk_under_rlimit_fsize_is_one_line_and_publishes_nothing(tmp_path, outputs, limit, culprit):
    out = tmp_path / "out"
    argv = ["run", "--model", str(FIXTURES / "models" / "tiny"), "--case", "text-only", "--no-oracle",
            *(a if a.startswith("--") else str(out / a) for a in outputs)]
    proc = subprocess.run([sys.executable, "-m", "parity.cli", *argv], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, preexec_fn=_fsize_limited(limit))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"(File too large: {out / culprit})" in lines[0] and "nothing was published" in lines[0], lines[0]
    assert not out.exists() or sorted(os.listdir(out)) == []  # no report, dump or --json, no temporary


def test_an_empty_report_folder_is_kept_when_the_run_is_then_refused(tmp_path, capsys):
    """The output check before the run takes an empty folder as it is (a mount point, say): a run
    refused after it (a bad checkpoint) leaves it there, empty."""
    import shutil

    ckpt = Path(shutil.copytree(FIXTURES / "models" / "tiny", tmp_path / "ckpt"))
    (ckpt / "model.safetensors").write_bytes(b"not a safetensors file")
    rep = tmp_path / "rep"
    rep.mkdir()
    assert main(["run", "--model", str(ckpt), "--case", "text-4", "--report-dir", str(rep)]) == 2
    assert "model.safetensors" in capsys.readouterr().err
    assert rep.is_dir() and list(rep.iterdir()) == []


def test_file_names_that_are_not_utf8_are_reported(tmp_path):
    """An image and output paths whose names are not UTF-8 (bytes a Linux file system allows): the
    run passes, and every output lands under its own (undecodable) name."""
    import shutil

    root = os.fsencode(tmp_path)
    image = root + b"/red-\xff.png"
    shutil.copy(FIXTURES / "images" / "solid-red.png", image)
    argv = ["run", "--model", str(FIXTURES / "models" / "tiny"), "--image", os.fsdecode(image), "--case", "image/*",
            "--no-oracle", "--report-dir", os.fsdecode(root + b"/rep-\xfe"),
            "--json", os.fsdecode(root + b"/r-\xfd.json")]
    assert main(argv) == 0  # the names as Python hands a command line's bytes over (surrogate escapes)
    assert os.path.isfile(root + b"/rep-\xfe/report.md") and os.path.isfile(root + b"/r-\xfd.json")
    rec = json.loads(open(root + b"/r-\xfd.json", "rb").read())
    assert rec["passed"] and "red-" in rec["cases"][0]["image"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder: run as an ordinary user")
def test_a_read_only_output_folder_is_refused_before_the_run(tmp_path, capsys):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        assert main(_run_args(tmp_path, "--report-dir", str(parent / "r"))) == 2
        assert "is not writable" in capsys.readouterr().err
    finally:
        parent.chmod(0o755)
