"""The command line's conventions: a version, `python -m`, and errors that name what failed."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from service_helpers import free_port

from fineprune import __version__
from fineprune.client import Client, ServiceUnreachable

FINEPRUNE = [sys.executable, "-m", "fineprune"]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "COLUMNS": "200"}
    env.pop("FINEPRUNE_URL", None)
    return subprocess.run([*FINEPRUNE, *args], capture_output=True, text=True, env=env, timeout=120)


def test_version_and_python_dash_m():
    done = _run("--version")
    assert done.returncode == 0 and done.stdout.strip() == f"fineprune {__version__}"
    assert __version__ != "0+unknown"  # installed: the version comes from the package
    helped = _run("--help")
    assert helped.returncode == 0
    for command in ("sanitize", "submit", "status", "download", "cancel", "serve"):
        assert command in helped.stdout


def test_the_client_names_the_url_it_could_not_reach():
    url = f"http://127.0.0.1:{free_port()}"
    with Client(url) as client, pytest.raises(ServiceUnreachable) as refused:
        client.get("0" * 32)
    assert url in str(refused.value) and "FINEPRUNE_URL" in str(refused.value)


def test_the_cli_names_the_url_it_could_not_reach():
    url = f"http://127.0.0.1:{free_port()}"
    done = _run("status", "--url", url)
    assert done.returncode == 1
    assert url in done.stderr and "Traceback" not in done.stderr
