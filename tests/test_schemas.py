from pathlib import Path

import pytest

from cellsam_ray.schemas import SCHEMAS, render

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_committed_schema_matches_its_model(name):
    committed = (ROOT / "schemas" / name).read_text()
    assert committed == render(SCHEMAS[name]), f"schemas/{name} is stale: run python -m cellsam_ray.schemas"
