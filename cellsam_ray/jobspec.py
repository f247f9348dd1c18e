"""Job spec files: a ``SegmentSpec`` written as YAML or JSON, read from a local path or any fsspec URL.

A spec file is submitted to clusters, kept beside results and shared, so it must never hold a secret:
storage credentials are named, not written (``storage_options_env`` names environment variables of the
machine the run starts on, ``storage_profile`` an AWS profile), and a spec with an inline key, secret,
token or password is refused (by ``SegmentSpec`` itself, as from the command line or the Python API).
Relative local paths in a spec are relative to the current directory, as on the command line; ``submit``
makes them absolute before the spec leaves this machine.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import yaml

from cellsam_ray.errors import UserError
from cellsam_ray.io.storage import read_text
from cellsam_ray.spec import SegmentSpec, validate_spec


def load_job_spec(source: str, storage_options: dict | None = None) -> SegmentSpec:
    """The spec in the YAML or JSON file at ``source`` (a path or fsspec URL), checked."""
    text = read_text(source, storage_options, what="job spec", expected="a YAML or JSON file")
    return spec_from_mapping(parse_spec_text(text, source), source)


def parse_spec_text(text: str, source: str) -> Any:
    """JSON for ``*.json``, YAML otherwise (YAML also reads most JSON)."""
    try:
        if source.lower().endswith(".json"):
            return json.loads(text)
        return yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as err:
        reason = " ".join(str(err).split())
        raise UserError(f"job spec {source} is not valid {'JSON' if source.endswith('.json') else 'YAML'}: "
                        f"{reason}") from None


def spec_from_mapping(data: Any, source: str) -> SegmentSpec:
    if not isinstance(data, dict):
        raise UserError(f"job spec {source} must be a mapping of fields (input, nuclear, ...), "
                        f"not {type(data).__name__}")
    return validate_spec(data, lambda where: f"job spec {source}: {where}")


def require_local_paths(spec: SegmentSpec) -> None:
    """A UserError naming every local path of the spec that this node does not have (the work folder is
    made when needed): the first check of a job, whose spec may have been written on another machine."""
    paths = spec.with_local_paths_absolute().local_paths()
    made = ("work_dir", "cohort_report")  # outputs, made when needed
    missing = {name: path for name, path in paths.items() if name not in made and not Path(path).exists()}
    if missing:
        raise UserError(f"the spec's local paths do not exist on this node ({socket.gethostname()}): "
                        f"{named_paths(missing)}; a spec run on a cluster must name paths its nodes have, or URLs "
                        "(s3://...)")


def named_paths(paths: dict[str, str]) -> str:
    """``local_paths`` as a user wrote them: ``input /a, config /b.json``."""
    return ", ".join(f"{SegmentSpec.model_fields[name].alias or name} {path}" for name, path in paths.items())


def portable_fields(spec: SegmentSpec, base: Path | None = None) -> dict:
    """The fields the user set, with relative local paths made absolute (from ``base``, default the
    current directory): what travels to a cluster. Unset fields stay unset, so defaults that depend on
    other fields (the bundled model's tiling) are still chosen where the spec runs."""
    return spec.with_local_paths_absolute(base).model_dump(mode="json", by_alias=True, exclude_unset=True)
