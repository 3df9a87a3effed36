"""The progress report: a bar on a terminal, a line per tenth off one (CI logs), with an ETA."""

import io

from parity.report import Progress


def test_progress_off_a_terminal_reports_each_tenth_with_an_eta():
    buf = io.StringIO()  # not a TTY: a CI log
    progress = Progress(buf)
    for i in range(21):
        progress(i, 20, f"model/case-{i}")
    lines = buf.getvalue().splitlines()
    assert len(lines) == 9 and lines[0].startswith("rmlx-parity: 2/20 done, ETA ") and "model/case-2" in lines[0]
