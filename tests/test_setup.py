"""tools/setup is the developer and lab installer: it never stops, disables or
kills a service or process it did not start (a real edge may run nginx, HAProxy
or etcd of its own)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SETUP = REPO / "tools" / "setup"


def test_setup_has_no_way_to_stop_other_processes() -> None:
    text = "\n".join(
        line for line in SETUP.read_text().splitlines() if not line.lstrip().startswith("#")
    )
    for pattern in (r"\bpkill\b", r"\bkillall\b", r"\bkill\b", r"systemctl\s+(stop|disable|kill)",
                    r"service\s+\S+\s+stop"):
        assert not re.search(pattern, text), pattern


@pytest.mark.root
def test_a_process_named_nginx_survives_setup() -> None:
    if os.geteuid() != 0:
        pytest.fail("tools/setup runs as root; run this suite as root (tools/test)")
    with tempfile.TemporaryDirectory() as d:
        fake = Path(d) / "nginx"
        shutil.copy("/bin/sleep", fake)
        proc = subprocess.Popen([str(fake), "120"])
        try:
            done = subprocess.run(["bash", str(SETUP)], capture_output=True, text=True,
                                  timeout=900)
            assert done.returncode == 0, done.stderr[-2000:]
            assert proc.poll() is None, "tools/setup ended a process it did not start"
        finally:
            proc.kill()
            proc.wait()
