"""One configuration style for every job: typed pydantic models, loaded from YAML with dotted
command-line overrides (``section.key=value``, values parsed as YAML).

Unknown keys are errors with a suggestion (a typo must not silently run the wrong thing), and
validation errors are reported as one line per problem naming the dotted key.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from pipelines.common.errors import InputError

_REPO_ROOT = Path(__file__).resolve().parents[2]

C = TypeVar("C", bound=BaseModel)


class Section(BaseModel):
    """Base of every config model and section: no unknown keys, assignments validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ConfigError(InputError):
    """A config that cannot be used; the message is meant to be printed as is."""


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = tree
    for key in parents:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {key!r} is not a section")
    node[leaf] = value


def parse_overrides(overrides: Sequence[str]) -> dict:
    """`["optim.base_lr=0.01", "model.options={width_mult: 1.0}"]` -> nested dict (values are YAML)."""
    tree: dict = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        _set_dotted(tree, key.strip(), yaml.safe_load(raw))
    return tree


def merge(base: Mapping, update: Mapping) -> dict:
    """Recursive dict merge; `update` wins. An empty mapping replaces (`model.options={}` clears
    the demo's options) rather than merging nothing."""
    out = dict(base)
    for key, value in update.items():
        both_dicts = isinstance(value, Mapping) and bool(value) and isinstance(out.get(key), Mapping)
        out[key] = merge(out[key], value) if both_dicts else value
    return out


def read_yaml(path: str | Path) -> dict:
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as err:
        raise ConfigError(f"cannot read config {path}: {err.strerror or err}{_nearby_configs(Path(path))}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def _nearby_configs(path: Path) -> str:
    """For a preset that is not there (`configs/<name>.yaml`): the presets there are, closest
    name first (the repository's when that folder is not beside the working directory)."""
    if path.parent.name != "configs":
        return ""
    folder = path.parent if path.parent.is_dir() else _REPO_ROOT / "configs"
    names = sorted(p.name for p in folder.glob("*.y*ml"))
    if not names:
        return ""
    close = difflib.get_close_matches(path.name, names, n=1, cutoff=0.5)
    hint = f"; did you mean {path.parent / close[0]}?" if close else ""
    return f"{hint} (presets: {', '.join(names)})"


def _known_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        keys.append(prefix + name)
        annotation = field.annotation
        for candidate in (annotation, *getattr(annotation, "__args__", ())):
            if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                keys += _known_keys(candidate, f"{prefix}{name}.")
            elif dataclasses.is_dataclass(candidate):
                keys += [f"{prefix}{name}.{f.name}" for f in dataclasses.fields(candidate)]
    return keys


def _closest_key(key: str, known: Sequence[str]) -> str | None:
    """The known key a misspelt one most likely meant: a sibling in the same section first
    (`optim.lr` -> `optim.base_lr`, whose whole dotted names differ too much), else any key."""
    section, _, leaf = key.rpartition(".")
    siblings = {k.rpartition(".")[2]: k for k in known if k.rpartition(".")[0] == section and k != section}
    close = difflib.get_close_matches(leaf, list(siblings), n=1, cutoff=0.4) if section else []
    if close:
        return siblings[close[0]]
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return close[0] if close else None


def describe_errors(err: ValidationError, model: type[BaseModel],
                    labels: Mapping[str, str] | None = None) -> str:
    """pydantic's errors as `key: problem` lines, with 'did you mean' for unknown keys. `labels`
    names keys the way the user gave them (e.g. `min_improvement` -> `--min-improvement`)."""
    known = _known_keys(model)
    lines = []
    for error in err.errors():
        key = ".".join(str(part) for part in error["loc"]) or "(top level)"
        key = (labels or {}).get(key, key)
        if error["type"] in ("extra_forbidden", "unexpected_keyword_argument"):
            close = _closest_key(key, known)
            lines.append(f"unknown key {key}" + (f"; did you mean {close}?" if close else ""))
        elif error["type"] == "missing" and "." not in key:  # the jobs' top-level fields are also flags
            lines.append(f"{key} is required (--{key.replace('_', '-')} or {key}=...)")
        else:
            lines.append(f"{key}: {error['msg'].removeprefix('Value error, ')}")
    return "; ".join(lines)


def load_config(model: type[C], path: str | Path | None = None, overrides: Sequence[str] = (),
                values: Mapping[str, Any] | None = None, labels: Mapping[str, str] | None = None) -> C:
    """`model` from the YAML file at `path` (if any), then `values` (e.g. from command-line flags),
    then dotted `overrides`, later ones winning. Raises ConfigError with a printable message
    (keys shown through `labels`, see describe_errors)."""
    data = read_yaml(path) if path is not None else {}
    data = merge(merge(data, values or {}), parse_overrides(overrides))
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(describe_errors(err, model, labels)) from None


def flag_labels(names: Sequence[str]) -> dict[str, str]:
    """Config keys given as command-line flags -> how the user typed them."""
    return {name: "--" + name.replace("_", "-") for name in names}


def flatten(tree: Mapping, prefix: str = "") -> dict[str, Any]:
    """Nested dict -> {"a.b.c": value} (MLflow params)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat
