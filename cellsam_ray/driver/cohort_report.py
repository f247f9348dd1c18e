"""A cohort's report: one row per slide (``cohort.parquet``) and one HTML page (``cohort.html``) with each
slide's overview picture and numbers, so that a person can look over a hundred slides in a minute.

The page is one file: each overview is embedded as a small JPEG (a hundred slides make a page of a few
MB), read from the slide's own QC picture
(``labels/<name>/qc/overview.png``) when the report is written, one at a time.
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import asdict, dataclass, fields

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from cellsam_ray.io.storage import join_url

THUMBNAIL = 240  # longest side of an overview on the page, pixels
STATUSES = ("succeeded", "failed", "stopped", "invalid", "finished_earlier", "not_started")
"""invalid: found unreadable before any model time (``skip_bad_slides``); finished_earlier: its label was
complete when the run began (rerunning a cohort skips those); not_started: the run stopped first."""
COLOURS = dict(succeeded="#1a7f37", failed="#cf222e", stopped="#9a6700", invalid="#cf222e",
               finished_earlier="#57606a", not_started="#57606a")


@dataclass
class SlideRow:
    """What the cohort report says of one slide."""

    url: str
    status: str = "not_started"
    cells: int | None = None
    tiles: int | None = None
    tiles_segmented: int | None = None
    tiles_failed: int | None = None
    seconds: float | None = None
    error: str | None = None
    labels: str | None = None  # the label image's URL
    report: str | None = None  # the slide's report.json
    overview: str | None = None  # the slide's QC overview picture


SCHEMA = pa.schema([(f.name, {"int | None": pa.int64(), "float | None": pa.float64()}.get(f.type, pa.string()))
                    for f in fields(SlideRow)])


def write_cohort_report(folder: str, rows: list[SlideRow], storage_options: dict | None = None) -> dict[str, str]:
    """Both files into ``folder``; returns their URLs."""
    table = pa.Table.from_pylist([asdict(row) for row in rows], schema=SCHEMA)
    where = dict(parquet=join_url(folder, "cohort.parquet"), html=join_url(folder, "cohort.html"))
    fs, path = fsspec.core.url_to_fs(folder, **(storage_options or {}))
    fs.makedirs(path, exist_ok=True)
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    _write(where["parquet"], buffer.getvalue(), storage_options)
    _write(where["html"], page(rows, storage_options).encode(), storage_options)
    return where


def _write(url: str, data: bytes, storage_options: dict | None) -> None:
    with fsspec.open(url, "wb", **(storage_options or {})) as f:
        f.write(data)


def page(rows: list[SlideRow], storage_options: dict | None = None) -> str:
    counts = {status: sum(row.status == status for row in rows) for status in STATUSES}
    cells = sum(row.cells or 0 for row in rows)
    summary = ", ".join(f"{n} {status.replace('_', ' ')}" for status, n in counts.items() if n)
    lines = [
        "<!doctype html><html><head><meta charset='utf-8'><title>cellsam-ray cohort</title><style>",
        "body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse}"
        "td,th{border-bottom:1px solid #d0d7de;padding:.4em .8em;text-align:left;vertical-align:top}"
        "td.n{text-align:right}img{display:block}",
        "</style></head><body>",
        f"<h1>{len(rows)} slides</h1><p>{html.escape(summary)}; {cells:,} cells in all.</p>",
        "<table><tr><th>overview</th><th>slide</th><th>status</th><th>cells</th><th>tiles</th>"
        "<th>seconds</th><th>error</th></tr>",
    ]
    for row in rows:
        picture = _thumbnail(row.overview, storage_options)
        image = f"<img src='data:image/jpeg;base64,{picture}' alt='overview'>" if picture else ""
        slide = html.escape(row.url)
        if row.report:
            slide += f"<br><small>{html.escape(row.report)}</small>"
        tiles = "" if row.tiles is None else f"{row.tiles_segmented or 0:,} / {row.tiles:,}"
        lines.append(
            f"<tr><td>{image}</td><td>{slide}</td>"
            f"<td style='color:{COLOURS.get(row.status, '#000')}'>{row.status.replace('_', ' ')}</td>"
            f"<td class='n'>{'' if row.cells is None else f'{row.cells:,}'}</td><td class='n'>{tiles}</td>"
            f"<td class='n'>{'' if row.seconds is None else f'{row.seconds:.1f}'}</td>"
            f"<td>{html.escape(row.error or '')}</td></tr>")
    lines.append("</table></body></html>")
    return "\n".join(lines)


def _thumbnail(url: str | None, storage_options: dict | None) -> str | None:
    """The picture at ``url`` shrunk to ``THUMBNAIL`` px, as base64 JPEG; None if there is none to read."""
    if not url:
        return None
    try:
        with fsspec.open(url, "rb", **(storage_options or {})) as f:
            picture = Image.open(io.BytesIO(f.read()))
            picture.load()
    except (OSError, ValueError):
        return None
    picture.thumbnail((THUMBNAIL, THUMBNAIL))
    buffer = io.BytesIO()
    picture.convert("RGB").save(buffer, format="JPEG", quality=85)
    return base64.b64encode(buffer.getvalue()).decode()
