"""JSON Schemas of the files users write and read, generated from the code that parses or writes them.

Job specs get a JSON Schema from their pydantic model; the cell table (Parquet) gets a JSON description
of its columns from ``table.schema``; a cohort report's rows (``cohort.parquet``) one from their dataclass. ``python -m cellsam_ray.schemas`` rewrites ``schemas/``; a test
fails when a committed schema drifts from its source.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pydantic import TypeAdapter

from cellsam_ray.driver.cohort_report import SlideRow
from cellsam_ray.report import RunReport
from cellsam_ray.spec import SegmentSpec
from cellsam_ray.table import schema as cell_table

SCHEMAS = {"job.schema.json": SegmentSpec, "report.schema.json": RunReport,
           "cells.schema.json": cell_table.describe, "cohort.schema.json": TypeAdapter(SlideRow)}


def render(source) -> str:
    """A pydantic model's JSON Schema, or what a describing function returns, as the committed text."""
    if hasattr(source, "model_json_schema") or isinstance(source, TypeAdapter):
        schema = source.json_schema(by_alias=True) if isinstance(source, TypeAdapter) else \
            source.model_json_schema(by_alias=True)
        schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    else:
        schema = source()
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def main(out_dir: str = "schemas") -> int:
    for name, source in SCHEMAS.items():
        Path(out_dir, name).write_text(render(source))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
