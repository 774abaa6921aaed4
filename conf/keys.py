"""Command-line overrides checked against the typed schema before Hydra composes them.

Hydra accepts `+section.unknown=1` (it appends the key) and the structured schema then drops it on the way to the
dataclasses, so a typo would vanish without a word; and Hydra's own hint for a mistyped key is to add that `+`.
Every dotted key of an override, with or without `+`/`++`/`~`, must name a field of the schema; a list of sections
(curriculum.stages) takes an index, a mapping (launcher.env) any name. A key that names nothing is refused with the
nearest real key.
"""
from __future__ import annotations

import dataclasses
import typing
from functools import lru_cache
from pathlib import Path
from typing import Any, List, Optional, Tuple

from conf.errors import ConfigError, did_you_mean

CONF_DIR = Path(__file__).resolve().parent


def config_groups() -> List[str]:
    """The groups a bare `name=option` picks from: the folders of conf/ (model, curriculum, experiment, ...)."""
    return sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir() and any(p.glob("*.yaml")))


def group_options(group: str) -> List[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def _unwrap(kind: Any) -> Any:
    """Optional[X] -> X."""
    if typing.get_origin(kind) is typing.Union:
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        return args[0] if len(args) == 1 else kind
    return kind


def _walk(kind: Any, parts: List[str]) -> Tuple[int, bool]:
    """How many leading parts name something in `kind`, and whether all do."""
    for depth, part in enumerate(parts):
        kind = _unwrap(kind)
        origin = typing.get_origin(kind)
        if dataclasses.is_dataclass(kind):
            hints = typing.get_type_hints(kind)
            if part not in hints:
                return depth, False
            kind = hints[part]
        elif origin in (list, List):
            if not part.isdigit():
                return depth, False
            kind = typing.get_args(kind)[0] if typing.get_args(kind) else Any
        elif origin in (dict, typing.Dict):
            return len(parts), True  # any name: launcher.env.FOO, launcher.k8s.node_selector.zone
        else:
            return depth, False  # a value has no keys below it
    return len(parts), True


@lru_cache(maxsize=None)
def known_keys(root: type) -> Tuple[str, ...]:
    """Every dotted key of the schema (a list of sections indexed as 0), for suggestions."""
    found: List[str] = []

    def visit(prefix: str, kind: Any) -> None:
        kind = _unwrap(kind)
        if dataclasses.is_dataclass(kind):
            for name, hint in typing.get_type_hints(kind).items():
                visit(f"{prefix}.{name}" if prefix else name, hint)
            return
        found.append(prefix)
        args = typing.get_args(kind)
        if typing.get_origin(kind) in (list, List) and args and dataclasses.is_dataclass(_unwrap(args[0])):
            visit(f"{prefix}.0", args[0])

    visit("", root)
    return tuple(found)


def override_key(override: str) -> Optional[str]:
    """The dotted key an override sets or deletes, or None for what Hydra alone decides (`hydra.*`, a group with a
    package `group@pkg=...`)."""
    key = override.split("=", 1)[0].strip()
    key = key.lstrip("~").removeprefix("++").removeprefix("+")
    if not key or "@" in key or key.startswith("hydra.") or key == "hydra":
        return None
    return key


def check_override_keys(overrides: List[str], root: type) -> None:
    """Refuse an override whose key is neither a config group nor a key of the schema `root`."""
    groups = config_groups()
    for override in overrides:
        key = override_key(override)
        if key is None:
            continue
        if override.startswith("--"):
            raise ConfigError(f"unknown option {override.split('=', 1)[0]} (python -m train --help for usage)")
        if "=" not in override and not override.startswith("~"):
            raise ConfigError(f"{override!r} is not an override: write key=value (e.g. zero.stage=2)")
        if key in groups:
            value = override.split("=", 1)[1].strip() if "=" in override else ""
            options = group_options(key)
            if value not in options and value not in ("null", "") and not override.startswith("~"):
                raise ConfigError(f"{key}={value}: no conf/{key}/{value}.yaml; options: {', '.join(options)}"
                                  f"{did_you_mean(value, options)}")
            continue
        parts = key.split(".")
        depth, ok = _walk(root, parts)
        if ok:
            continue
        known = known_keys(root)
        shape = ".".join("0" if part.isdigit() else part for part in parts)
        hint = did_you_mean(shape, known) or did_you_mean(shape, groups)
        if depth == 0:
            sections = list(typing.get_type_hints(root))
            raise ConfigError(f"unknown key {key}{hint}: a key starts with a section "
                              f"({', '.join(sections)}) or names a config group ({', '.join(groups)})")
        raise ConfigError(f"unknown key {key}{hint}: {'.'.join(parts[:depth])} has no {parts[depth]!r} "
                          f"(docs/configuration.md lists every key)")
