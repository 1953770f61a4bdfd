"""/docs and /redoc render in a real browser with no network: their assets are served locally.

Headless Chromium (Debian's `chromium`, which `.ci/run` installs) loads each page from a real
API process and dumps the DOM once the page's script has run; the operations must be there,
and no asset may come from anywhere but the API itself.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from service_helpers import free_port, service_env, start_api, wait_api

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="needs Debian's chromium (`apt-get install chromium`; .ci/run installs it)",
)
# Chromium started as a test tool: no sandbox (root in CI), nothing fetched in the background.
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--virtual-time-budget=15000",
    "--dump-dom",
]


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("docs-api")
    port = free_port()
    proc = start_api(service_env(root / "artifacts", None), port, root / "api.log")
    base = f"http://127.0.0.1:{port}"
    try:
        wait_api(base, proc)
        yield base
    finally:
        proc.stop()


def _rendered(url: str, profile: Path) -> str:
    done = subprocess.run(
        [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def _asset_hosts(page: str) -> set[str]:
    """Hosts of the scripts and stylesheets the served page asks for."""
    urls = re.findall(r"""(?:src|href)=["']([^"']+)["']""", page)
    return {m.group(1) for u in urls if (m := re.match(r"https?://([^/]+)", u))}


def test_swagger_ui_renders_every_operation_offline(api: str, tmp_path: Path) -> None:
    served = httpx.get(f"{api}/docs").text
    assert _asset_hosts(served) == set(), "the page must not load assets from elsewhere"
    dom = _rendered(f"{api}/docs", tmp_path / "profile")
    assert "swagger-ui" in dom
    blocks = re.findall(r'class="opblock opblock-(get|post|delete)', dom)
    assert len(blocks) >= 8, dom[-3000:]
    for path in ("/v1/jobs", "/v1/jobs/{job_id}/model", "/healthz"):
        assert path in dom


def test_redoc_renders_the_operations_offline(api: str, tmp_path: Path) -> None:
    served = httpx.get(f"{api}/redoc").text
    assert _asset_hosts(served) == set()
    dom = _rendered(f"{api}/redoc", tmp_path / "profile")
    assert "redoc" in dom.lower()
    assert "/v1/jobs/{job_id}/report" in dom
    assert "Submit" in dom or "submit" in dom
