"""Test-only: the folder a new user works in during their first hour, and a way to run their commands.

`make_workspace(root)` writes what the README's commands expect to find: `my_videos/` and `meta.csv` (a table of
clips of two rights holders), `v2d_out/` (video2dataset-style KEY.mp4/.txt/.json with the license under
meta.license_id), a `hostfile`, and two small trained runs, `runs/demo` and `runs/mine`, of a dataset of those
clips (`datasets/fixture`). `run(command, cwd)` runs one shell command line as the user would type it: a `python`
or `python3` command through tests/forked_ranks.py (the same entry point, arguments, exit status and output as a
fresh interpreter, without paying for the imports each time), anything else through bash.
"""
from __future__ import annotations

import csv
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

from tests.forked_ranks import run_ranks

HOLDERS = ("Blender Foundation", "Studio B")
TINY_RUN = ["experiment=demo", "data.root=datasets/fixture", "data.validation_root=datasets/fixture_validation",
            "tracking.mode=disabled", "tracking.eval_prompts=2", "tracking.eval_clips=2", "tracking.sampling_steps=2", "curriculum.stages.0.steps=2",
            "curriculum.stages.1.steps=1", "train.checkpoint_every=3"]


def user_env(home: Path) -> Dict[str, str]:
    """A user's shell: no W&B login (an empty HOME), Kino's interpreter first on PATH as `python` and `python3`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_") and k != "NETRC"}
    bin_dir = home / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name in ("python", "python3"):
        link = bin_dir / name
        if not link.exists():
            link.symlink_to(sys.executable)
    env.update(HOME=str(home), PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", OMP_NUM_THREADS="1",
               WANDB_SILENT="true")
    return env


def python_words(words: List[str]) -> Optional[List[str]]:
    """A `python ...` / `python3 ...` command as forked_ranks runs it (sys.executable first), else None."""
    if words and words[0] in ("python", "python3"):
        return [sys.executable, *words[1:]]
    return None


def run(line: str, cwd: Path, env: Dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    words = shlex.split(line, comments=True)
    python = python_words(words) if not any(w in ("|", ">", "<", "&&", ";") for w in words) else None
    if python is not None:
        return run_ranks(python, cwd=cwd, env=env, timeout=timeout)
    return subprocess.run(["bash", "-c", line], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def procedural_clips(count: int, seed: int):
    from data.demo_set import procedural_samples

    return list(procedural_samples(count, seed))


def write_table(videos: Path, table: Path, count: int = 6, seed: int = 11) -> None:
    videos.mkdir(parents=True, exist_ok=True)
    rows = []
    for index, (key, video, caption, _) in enumerate(procedural_clips(count, seed)):
        (videos / f"{key}.mp4").write_bytes(video)
        rows.append({"video": f"{key}.mp4", "caption": caption, "license": "CC-BY-4.0",
                     "source_url": f"https://example.org/{key}", "attribution": HOLDERS[index % 2],
                     "rights_holder": HOLDERS[index % 2]})
    with open(table, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def write_video2dataset(folder: Path, count: int = 3, seed: int = 12) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for key, video, caption, _ in procedural_clips(count, seed):
        stem = folder / f"v2d-{key}"
        stem.with_suffix(".mp4").write_bytes(video)
        stem.with_suffix(".txt").write_text(caption)
        stem.with_suffix(".json").write_text(json.dumps({
            "url": f"https://example.org/v2d/{key}", "meta": {"license_id": "CC0-1.0"},
            "source_url": f"https://example.org/v2d/{key}", "attribution": "Studio C", "rights_holder": "Studio C"}))


def make_workspace(root: Path) -> Path:
    from data.ingest import check_table, ingest_rows, prepare_output, read_table, rows_from_table

    root.mkdir(parents=True, exist_ok=True)
    write_table(root / "my_videos", root / "meta.csv")
    write_video2dataset(root / "v2d_out")
    (root / "hostfile").write_text("gpu-node-1 slots=8\ngpu-node-2 slots=8\n")
    fixture_clips = root / "fixture_videos"
    write_table(fixture_clips, root / "fixture.csv", count=8, seed=13)
    records = read_table(root / "fixture.csv")
    check_table(records, {}, root / "fixture.csv")
    ingest_rows(rows_from_table(fixture_clips, records, {}), prepare_output(root / "datasets" / "fixture"), 4, None)
    from data.demo_set import build_validation

    build_validation(root / "datasets" / "fixture_validation_parent", count=2)
    (root / "datasets" / "fixture_validation_parent" / "validation").rename(root / "datasets" / "fixture_validation")
    trained = run_ranks([sys.executable, "-m", "train", *TINY_RUN, "train.run_dir=runs/demo"], cwd=root,
                        env=user_env(root / "home"), timeout=300)
    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-3000:]
    shutil.copytree(root / "runs" / "demo", root / "runs" / "mine")
    return root
