"""Which slides a spec names: one slide, or a cohort given as a list of URLs, a glob, a prefix or a manifest.

- a list (``cellsam-ray segment A B``, ``input: [A, B]`` in a job spec): those slides, each of which may
  itself be a glob;
- a glob (``s3://bucket/study/*.ome.zarr``): the matches, sorted;
- a prefix: a folder that is not itself a Zarr group and holds slides: its ``*.zarr`` children, sorted;
- a manifest (``*.txt``: one URL per line, ``#`` comments; ``*.csv`` / ``*.tsv``: a column ``url`` (or
  ``input``) and optional ``nuclear`` and ``whole_cell`` columns naming that slide's channels, several
  separated by commas). A relative path in a local manifest is relative to the manifest's folder.

Anything else is one slide, as before. The same slide named twice is segmented once.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass

import fsspec

from cellsam_ray.errors import UserError
from cellsam_ray.io.storage import is_local, join_url, local_path, read_text

MANIFESTS = (".txt", ".csv", ".tsv")
ZARR_MARKERS = ("zarr.json", ".zgroup", ".zattrs")
GLOB_CHARACTERS = set("*?[")


@dataclass(frozen=True)
class SlideInput:
    """One slide of a run, and the channel names it alone uses (None: the spec's)."""

    url: str
    nuclear: tuple[str, ...] | None = None
    whole_cell: tuple[str, ...] | None = None


def named_slides(given: str | list[str], storage_options: dict | None = None) -> tuple[list[SlideInput], bool]:
    """The slides ``given`` names, and whether it names a cohort (a list, glob, prefix or manifest; a
    cohort of one is still a cohort: it gets a cohort report)."""
    if isinstance(given, str) and not _is_glob(given) and not given.lower().endswith(MANIFESTS) \
            and not _is_prefix(given, storage_options):
        return [SlideInput(given)], False
    found: list[SlideInput] = []
    for item in [given] if isinstance(given, str) else given:
        if _is_glob(item):
            slides = [SlideInput(url) for url in _glob(item, storage_options)]
            if not slides:
                raise UserError(f"no slide matches {item}")
        elif item.lower().endswith(MANIFESTS):
            slides = _manifest(item, storage_options)
        elif _is_prefix(item, storage_options):
            slides = [SlideInput(url) for url in _children(item, storage_options)]
        else:
            slides = [SlideInput(item)]
        found += slides
    unique: dict[str, SlideInput] = {}
    for slide in found:
        unique.setdefault(slide.url.rstrip("/"), slide)
    if not unique:
        raise UserError("the input names no slide")
    return list(unique.values()), True


def _is_glob(url: str) -> bool:
    return bool(GLOB_CHARACTERS & set(url.split("://")[-1]))


def _fs(url: str, storage_options: dict | None):
    return fsspec.core.url_to_fs(url, **(storage_options or {}))


def _with_scheme(url: str, path: str) -> str:
    """``path`` as ``url`` names places: a plain local path, or with its scheme."""
    scheme = url.split("://")[0] if "://" in url else ""
    return path if not scheme or scheme == "file" else f"{scheme}://{path.split('://')[-1]}"


def _glob(pattern: str, storage_options: dict | None) -> list[str]:
    fs, path = _fs(pattern, storage_options)
    return sorted(_with_scheme(pattern, match) for match in fs.glob(path.rstrip("/")))


def _is_prefix(url: str, storage_options: dict | None) -> bool:
    """A folder that is not a Zarr group itself and holds ``*.zarr`` slides (a study folder). Anything else
    is taken for one slide, whose own checks say what is wrong with it."""
    try:
        fs, path = _fs(url, storage_options)
        if not fs.isdir(path) or any(fs.exists(f"{path.rstrip('/')}/{marker}") for marker in ZARR_MARKERS):
            return False
        return bool(_children(url, storage_options))
    except Exception:  # noqa: BLE001 - unreachable here: the one-slide path says why, in its own words
        return False


def _children(url: str, storage_options: dict | None) -> list[str]:
    fs, path = _fs(url, storage_options)
    names = sorted(child.rstrip("/") for child in fs.ls(path, detail=False) if child.rstrip("/").endswith(".zarr"))
    return [_with_scheme(url, name) for name in names]


def _manifest(url: str, storage_options: dict | None) -> list[SlideInput]:
    text = read_text(url, storage_options, what="manifest", expected="a list of slides")
    base = str(local_path(url).parent) if is_local(url) else None
    if url.lower().endswith(".txt"):
        rows = [dict(url=line.strip()) for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    else:
        rows = list(csv.DictReader(io.StringIO(text), delimiter="\t" if url.lower().endswith(".tsv") else ","))
        column = next((name for name in ("url", "input") if rows and name in rows[0]), None)
        if column is None:
            raise UserError(f"manifest {url} needs a column named url (or input): it has "
                            f"{', '.join(rows[0]) if rows else 'no rows'}")
        rows = [dict(row, url=row[column]) for row in rows]
    slides = []
    for row in rows:
        where = (row.get("url") or "").strip()
        if not where:
            continue
        if base is not None and is_local(where) and not local_path(where).is_absolute():
            where = join_url(base, where)
        slides.append(SlideInput(where, _names(row.get("nuclear")), _names(row.get("whole_cell"))))
    if not slides:
        raise UserError(f"manifest {url} names no slide")
    return slides


def _names(cell: str | None) -> tuple[str, ...] | None:
    names = tuple(name.strip() for name in (cell or "").split(",") if name.strip())
    return names or None
