"""The one HTML module: escaping, the shared CSS, images as data URIs, the page around a report's body. Every
report is one self-contained file (no external resources), so it can be mailed or attached to a ticket."""

from __future__ import annotations

import base64
import html
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

BASE_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 2em auto; max-width: 1100px;
       color: #1d1d1f; padding: 0 1em; }
h1 { margin-bottom: 0.1em; } h2 { margin-top: 2.2em; border-bottom: 2px solid #ddd; padding-bottom: 0.2em; }
h3 { margin-top: 1.4em; }
.meta { color: #666; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.88em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.55em; text-align: right; vertical-align: top; }
th { background: #f3f3f3; } td.l, th.l { text-align: left; }
tr.pooled td { background: #f7f7fb; } tr.median td { background: #eef5ee; font-weight: 600; }
td.overflow, span.overflow { color: #a04000; font-weight: 600; }
.warn { background: #fff4e0; border: 1px solid #e0a040; padding: 0.4em 0.8em; border-radius: 4px; }
.verdict { display: inline-block; padding: 0.15em 0.7em; border-radius: 4px; color: white; font-weight: 700; }
.verdict.keep { background: #2c7a3f; } .verdict.rollback { background: #b3261e; }
.verdict.inconclusive { background: #7a6a2c; } .verdict.none { background: #777; }
.reason { white-space: pre-wrap; }
img { max-width: 100%; display: block; margin: 0.4em 0; }
code, pre { font-size: 0.85em; } pre { background: #f6f6f6; padding: 0.6em; overflow-x: auto; }
.note { font-style: italic; }
"""


def escape(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def img_tag(png: bytes, alt: str) -> str:
    return f'<img alt="{escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


def fmt_time(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def page(title: str, body: Iterable[str], *, css: str = BASE_CSS, footer: str = "") -> str:
    """A whole HTML document: `title` escaped here, `body` parts already HTML, inline CSS."""
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{escape(title)}</title><style>{css}</style></head><body>\n"
            + "\n".join(body) + footer + "\n</body></html>\n")


def write_page(path: Path, document: str) -> Path:
    """Write a page, making its directory (`--html new/dir/r.html` was checked writable up front)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(document, encoding="utf-8")
    return path
