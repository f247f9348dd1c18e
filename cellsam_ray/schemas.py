"""JSON Schemas of the files users write and read, generated from the pydantic models that parse them.

``python -m cellsam_ray.schemas`` rewrites ``schemas/``; a test fails when a committed schema drifts
from its model.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from cellsam_ray.spec import SegmentSpec

SCHEMAS = {"job.schema.json": SegmentSpec}


def render(model) -> str:
    schema = model.model_json_schema(by_alias=True)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def main(out_dir: str = "schemas") -> int:
    for name, model in SCHEMAS.items():
        Path(out_dir, name).write_text(render(model))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
