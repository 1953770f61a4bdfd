"""Writing a report's three files, each replaced atomically: report.json, .png and .html."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable
from pathlib import Path

from fineprune.report.figure import render_curve_png
from fineprune.report.html import render_html
from schemas.report import SanitizeReport


def _atomic_write(dest: Path, write: Callable[[Path], object]) -> None:
    """Readers polling the output folder must never see a half-written file.

    The temporary name is not pre-created (unlike mkstemp) so the file gets the usual
    umask-derived permissions rather than 0600, which a separate web process could not read.
    """
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        write(tmp)
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def write_report_files(report: SanitizeReport, out_dir: Path) -> dict[str, Path]:
    """The three artifacts of a run, each replaced atomically; the HTML embeds the PNG."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out_dir / "report.json",
        "png": out_dir / "report.png",
        "html": out_dir / "report.html",
    }
    _atomic_write(
        paths["json"],
        lambda p: p.write_text(report.model_dump_json(indent=2) + "\n", encoding="utf-8"),
    )
    _atomic_write(paths["png"], lambda p: render_curve_png(report, p))
    _atomic_write(
        paths["html"],
        lambda p: p.write_text(render_html(report, paths["png"]), encoding="utf-8"),
    )
    return paths
