"""What the bundle end-to-end tests share: running ``python -m monai.bundle`` as users do, merged config lists, and
the metadata / network checks every bundle must pass. Imported by ``tests/test_<bundle>_bundle.py``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO.parent / "shared" / "schema" / "meta_schema_20240725.json"


def run_bundle(*args: str, cwd: Path = REPO, timeout: int = 900, **env: str) -> subprocess.CompletedProcess:
    """Run ``python -m monai.bundle ARGS`` in a subprocess, as the docs tell users to (``env`` adds variables)."""
    environ = {**os.environ, "PYTHONUNBUFFERED": "1", **env}
    return subprocess.run([sys.executable, "-m", "monai.bundle", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=environ)


def merged(configs: Path, *names: str) -> str:
    """The ``--config_file`` value that merges configs of ``configs`` (a bundle's configs folder) in order."""
    return "[" + ",".join(f"'{configs / name}'" for name in names) + "]"


def check_metadata_and_network(configs: Path, *net_args: str, **env: str) -> None:
    """metadata.json verifies against the offline MONAI schema, ``verify_net_in_out network_def`` passes (with
    ``net_args`` overrides), and the version has a changelog entry; skips without the schema."""
    if not SCHEMA.exists():
        pytest.skip(f"offline MONAI metadata schema not found at {SCHEMA}")
    meta = run_bundle("verify_metadata", "--meta_file", str(configs / "metadata.json"), "--filepath", str(SCHEMA),
                      **env)
    assert meta.returncode == 0, meta.stderr
    net = run_bundle("verify_net_in_out", "network_def", "--meta_file", str(configs / "metadata.json"),
                     "--config_file", str(configs / "inference.json"), *net_args, **env)
    assert net.returncode == 0, net.stderr[-2000:]
    meta_doc = json.loads((configs / "metadata.json").read_text())
    assert meta_doc["intended_use"] == "research, not for diagnosis"
    assert meta_doc["version"] in meta_doc["changelog"]
