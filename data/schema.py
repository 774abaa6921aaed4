"""The video shard sample contract (docs/data.md) and the manifest format.

A sample is `KEY.mp4` + `KEY.txt` (caption) + `KEY.json` (metadata). Compatible
with video2dataset output; extra json fields are kept.
"""
from __future__ import annotations

import json
from typing import Any, Dict, List

from conf.errors import UserError

REQUIRED_FIELDS = ("license", "source_url", "attribution", "rights_holder", "width", "height", "fps", "num_frames")
POSITIVE_NUMBER_FIELDS = ("width", "height", "fps", "num_frames")
MANIFEST_NAME = "manifest.json"
MANIFEST_VERSION = 1
# Fields of the contract beside the required ones, and the columns ingest reads for a row's file, caption and key.
OPTIONAL_FIELDS = ("clip_span", "source_clip_span", "aesthetic")
ROW_FIELDS = ("video", "caption", "key")


class NotADataset(UserError, FileNotFoundError):
    """A folder given as a dataset holds no manifest."""


def metadata_problems(meta: Dict[str, Any]) -> List[str]:
    """What is wrong with a sample's metadata, as short reasons; empty if it is valid."""
    problems = [f"missing {name}" for name in REQUIRED_FIELDS if meta.get(name) in (None, "")]
    for name in POSITIVE_NUMBER_FIELDS:
        value = meta.get(name)
        if value not in (None, "") and (not isinstance(value, (int, float)) or value <= 0):
            problems.append(f"{name} is not a positive number")
    return problems


def parse_metadata(raw: bytes) -> Dict[str, Any]:
    meta = json.loads(raw.decode("utf-8"))
    if not isinstance(meta, dict):
        raise ValueError("metadata is not a JSON object")
    return meta


def read_manifest(root) -> Dict[str, Any]:
    from data.storage import location

    path = location(root) / MANIFEST_NAME
    if not path.exists():
        raise NotADataset(f"no {MANIFEST_NAME} in {root}: not a dataset (build one with `python -m data ingest`, "
                                f"or the demo's with `python -m data.demo_set {root}`)")
    manifest = json.loads(path.read_text())
    if manifest.get("version") != MANIFEST_VERSION:
        raise ValueError(f"{path}: manifest version {manifest.get('version')} is not {MANIFEST_VERSION}")
    return manifest


def write_manifest(root, manifest: Dict[str, Any]) -> None:
    """Replace a dataset's manifest atomically: a reader sees the old one or the new one, never part of either."""
    from data.storage import location, write_text

    write_text(location(root) / MANIFEST_NAME, json.dumps(manifest, indent=1, sort_keys=True))
