"""Command-line flags derived from the settings dataclasses, so a new TTA variant or CRF field
gets its flag without touching the scripts: `--scales/--no-flip/--fusion` from `TTASettings`
(segment.py, tune_crf.py), `--crf-<field>` from `CRFParams` (segment.py)."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any

from deeplab_core.constants import CRFParams, TTASettings


def _numbers(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"scales must be comma-separated numbers, got {text!r}") from None


def add_tta_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per TTASettings field: a tuple as comma-separated numbers, a bool that defaults
    on as `--no-<name>` (off: `--<name>`), a Literal as choices. Unset flags stay None."""
    hints = typing.get_type_hints(TTASettings)
    for field in dataclasses.fields(TTASettings):
        flag, help_text = "--" + field.name.replace("_", "-"), field.metadata.get("help", field.name)
        kind = hints[field.name]
        if kind is bool:
            flag = flag if not field.default else "--no-" + flag[2:]
            parser.add_argument(flag, dest=field.name, action="store_const", const=not field.default,
                                default=None, help=("no " if field.default else "") + help_text)
        elif typing.get_origin(kind) is typing.Literal:
            parser.add_argument(flag, dest=field.name, choices=typing.get_args(kind), default=None,
                                help=f"{help_text} (default: {field.default})")
        else:
            default = ",".join(f"{v:g}" for v in field.default)
            parser.add_argument(flag, dest=field.name, type=_numbers, default=None,
                                help=f"{help_text}; comma-separated, '1' for single scale (default: {default})")


def tta_values(args: argparse.Namespace) -> dict[str, Any]:
    """The TTA flags given, as config values (the config's `tta` section)."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(TTASettings)}
    given = {name: value for name, value in given.items() if value is not None}
    return {"tta": given} if given else {}


def add_crf_flags(parser: argparse.ArgumentParser) -> None:
    """`--crf-<field>` for every CRFParams field; unset ones come from a registered version's
    tuned set (pipelines/tune_crf.py) or the defaults."""
    hints = typing.get_type_hints(CRFParams)
    for field in dataclasses.fields(CRFParams):
        tuned = " (overrides a registered version's tuned value)" if field.metadata["search"] else ""
        parser.add_argument("--crf-" + field.name.replace("_", "-"), dest="crf_" + field.name,
                            type=hints[field.name], default=None,
                            help=f"dense CRF {field.metadata['help']}{tuned} (default: {field.default})")


def crf_values(args: argparse.Namespace) -> dict[str, float | int]:
    """The `--crf-*` flags given, as CRFSettings fields."""
    values = {f.name: getattr(args, "crf_" + f.name) for f in dataclasses.fields(CRFParams)}
    return {name: value for name, value in values.items() if value is not None}
