"""The Vagrant VM definition stays valid (Debian's vagrant validates it)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VAGRANTFILE = REPO / "vagrant" / "Vagrantfile"

pytestmark = pytest.mark.skipif(
    shutil.which("vagrant") is None, reason="vagrant not installed (tools/setup installs it)"
)


def _validate(folder: Path) -> subprocess.CompletedProcess[str]:
    # Provider blocks are skipped (-p): no VirtualBox or libvirt can run here,
    # and validating them would only test that fact.
    env = dict(
        os.environ,
        VAGRANT_CWD=str(folder),
        VAGRANT_DEFAULT_PROVIDER="virtualbox",
        VAGRANT_HOME=str(folder / ".vagrant.d"),
        VAGRANT_CHECKPOINT_DISABLE="1",
    )
    return subprocess.run(
        ["vagrant", "validate", "-p"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_vagrantfile_validates(tmp_path: Path) -> None:
    shutil.copy(VAGRANTFILE, tmp_path / "Vagrantfile")
    result = _validate(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "validated successfully" in result.stdout


def test_broken_vagrantfile_is_caught(tmp_path: Path) -> None:
    text = VAGRANTFILE.read_text().replace(
        'config.vm.hostname = "edgeproxy-lab"',
        'config.vm.hostname = "edgeproxy-lab"\n  config.vm.no_such_option = 1',
    )
    (tmp_path / "Vagrantfile").write_text(text)
    result = _validate(tmp_path)
    assert result.returncode != 0


def test_vm_provisions_with_the_project_setup() -> None:
    text = VAGRANTFILE.read_text()
    assert "tools/setup" in text
    assert 'config.vm.box = "debian/bookworm64"' in text
