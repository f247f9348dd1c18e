"""Pydantic fields as command-line options, for the commands whose options are a model's fields
(``segment`` from ``SegmentSpec``, ``train`` and ``finetune`` from their settings)."""

from __future__ import annotations

import typing


def option_flag(name: str) -> str:
    """The flag of a field: ``--field-name``."""
    return "--" + name.replace("_", "-")


def base_type(annotation):
    """``X`` for ``X | None``, else the annotation itself."""
    args = typing.get_args(annotation)
    others = [a for a in args if a is not type(None)]
    return others[0] if type(None) in args and len(others) == 1 else annotation
