"""A newcomer's first hour: every mistake answers in one line with its exit status, nothing is overwritten, and
every command README.md and docs/*.md show runs on this machine (dry-run forms for clusters and GPUs)."""
import hashlib
import re
import shlex
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.integration.first_hour import TINY_RUN, make_workspace, run, user_env


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("first_hour"))


@pytest.fixture(scope="module")
def env(workspace):
    return user_env(workspace / "home")


# (a user's mistake, its exit status, words its one line must hold). Each runs in the workspace; none may print a
# traceback, and each answers in a single line on stderr.
MISTAKES = [
    ("python -m train --dry-run +zero.stag=1", 2, "did you mean zero.stage?"),
    ("python -m train --dry-run zero.stag=1", 2, "did you mean zero.stage?"),
    ("python -m train --dry-run +foo.bar=1", 2, "unknown key foo.bar"),
    ("python -m train --dry-run curriculum.stages.0.stepz=5", 2, "did you mean curriculum.stages.0.steps?"),
    ("python -m train --dry-run curriculum.stages.0.steps=abc", 2, "'abc' of type 'str' could not be converted"),
    ("python -m train --dry-run model=wan_14b", 2, "did you mean wan_14B?"),
    ("python -m train --dry-run --steps=3", 2, "unknown option --steps"),
    ("python -m train data.root=my_videos", 2, "data.root=my_videos: no manifest.json"),
    ("python -m data ingest --videos my_videos --metadata meta.csv --out d1 --map licence=license", 2,
     "did you mean license?"),
    ("python -m data ingest --videos my_videos --metadata meta.csv --out d2 --map license", 2, "FIELD=SOURCE"),
    ("python -m data ingest --videos my_videos --metadata missing.csv --out d3", 2, "missing.csv: no such file"),
    ("python -m data ingest --videos nowhere --metadata meta.csv --out d4", 2, "--videos nowhere: no such folder"),
    ("python -m data ingest --videos my_videos --metadata renamed.csv --out d5", 2, "no row has video"),
    ("python -m data ingest --videos my_videos --metadata meta.csv --out datasets/fixture", 2,
     "already holds a dataset"),
    ("python -m data ingest --videos my_videos --metadata meta.csv --out my_videos", 2, "give a new or empty folder"),
    ("python -m data ingest --videos my_videos --metadata meta.csv --out d6 --samples-per-shard 0", 2,
     "at least 1"),
    ("python -m data verify my_videos", 2, "not a dataset"),
    ("python -m data inspect my_videos", 2, "not a dataset"),
    ("python -m data encode my_videos --out lat", 2, "not a dataset"),
    ("python -m data takedown datasets/fixture --rights-holder 'Blender Foundaton'", 2,
     "did you mean 'Blender Foundation'?"),
    ("python -m data takedown datasets/fixture --rights-holder 'Studio B' --run runs/nowhere", 2,
     "--run runs/nowhere: not a run directory"),
    ("python -m data audit runs/demo --rights-holder 'Blender Foundaton'", 1, "did you mean 'Blender Foundation'?"),
    ("python -m train.memory --world-size 0", 2, "at least 1"),
    ("python -m train.memory --gpu RTX9090", 2, "not a GPU kind"),
    ("python -m train.memory --gpu h100", 2, "did you mean H100?"),
    ("python -m train.generate runs/demo --prompt 'a red circle' --out g --frames 0", 2, "at least 1"),
    ("python -m train.generate runs/demo --prompt 'a red circle' --out g --width 30 --height 17", 2,
     "multiples of 4"),
    ("python -m train.generate my_videos --prompt 'a red circle' --out g", 2, "no complete checkpoint"),
    ("python -m train.export my_videos", 2, "no complete checkpoint"),
    ("python -m launch local experiment=demo data.root=datasets/fixture tracking.mode=online", 2, "wandb login"),
    ("python -m train experiment=demo data.root=datasets/fixture tracking.mode=online", 2, "wandb login"),
    # the checkpoint's config differs: refused before any process starts, by both entry points
    (f"python -m launch local {' '.join(TINY_RUN)} "
     "train.run_dir=runs/mine model.dim=64", 2, "changed keys that shape training: model.dim"),
    (f"python -m train {' '.join(TINY_RUN)} "
     "train.run_dir=runs/mine model.dim=64", 2, "changed keys that shape training: model.dim"),
    ("python -m launch nowhere", 2, "local|slurm|k8s|deepspeed"),
]


def one_line(text: str) -> bool:
    return len(text.strip().splitlines()) == 1


@pytest.mark.parametrize("command, status, words", MISTAKES, ids=[m[0][10:70] for m in MISTAKES])
def test_a_mistake_answers_in_one_line(workspace, env, command, status, words):
    if "renamed.csv" in command:  # the right clips under the wrong column names
        text = (workspace / "meta.csv").read_text()
        (workspace / "renamed.csv").write_text(text.replace("video,", "file,", 1))
    result = run(command, workspace, env)
    output = result.stdout + result.stderr
    assert result.returncode == status, output[-3000:]
    assert "Traceback" not in output, output[-3000:]
    assert words in result.stderr, result.stderr[-3000:]
    if command.startswith("python -m launch nowhere"):
        return  # the usage text
    assert one_line(result.stderr), result.stderr[-3000:]
    for out in ("d1", "d2", "d3", "d4", "d5", "d6", "lat", "g"):
        assert not (workspace / out).exists(), f"{command} left {out}/ behind"


def test_help_lists_the_groups_and_where_keys_are_documented(workspace, env):
    result = run("python -m train --help", workspace, env)
    assert result.returncode == 0, result.stderr
    assert "config groups" in result.stdout and "wan_14B" in result.stdout
    assert "docs/configuration.md" in result.stdout
    data_help = run("python -m data --help", workspace, env)
    assert "encode licensed video datasets." in data_help.stdout  # the whole description, not half a sentence


def tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        digest.update(str(path.relative_to(root)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


def test_ingest_onto_a_dataset_refuses_and_leaves_it_byte_identical_until_append_or_force(workspace, env):
    target = workspace / "datasets" / "twice"
    first = run("python -m data ingest --videos my_videos --metadata meta.csv --out datasets/twice", workspace, env)
    assert first.returncode == 0, first.stderr
    before = tree_digest(target)
    again = run("python -m data ingest --videos my_videos --metadata meta.csv --out datasets/twice", workspace, env)
    assert again.returncode == 2 and "--append" in again.stderr and "--force" in again.stderr
    assert tree_digest(target) == before
    # --append: a new shard set beside the old, in one manifest; keys already there are refused, each named
    import json

    more = run("python -m data ingest --video2dataset v2d_out --out datasets/twice --append "
               "--map license=meta.license_id", workspace, env)
    assert more.returncode == 0, more.stderr
    manifest = json.loads((target / "manifest.json").read_text())
    assert [r["path"] for r in manifest["shards"]] == ["shard-00000.tar", "shard-a1-00000.tar"]
    assert sum(r["num_samples"] for r in manifest["shards"]) == 6 + 3
    assert run("python -m data verify datasets/twice", workspace, env).returncode == 0
    same = run("python -m data ingest --videos my_videos --metadata meta.csv --out datasets/twice --append",
               workspace, env)
    assert same.returncode == 1 and "duplicate key: the dataset already holds" in same.stdout
    replaced = run("python -m data ingest --videos my_videos --metadata meta.csv --out datasets/twice --force",
                   workspace, env)
    assert replaced.returncode == 0, replaced.stderr
    manifest = json.loads((target / "manifest.json").read_text())
    assert [r["path"] for r in manifest["shards"]] == ["shard-00000.tar"] and "appended" not in manifest
    assert not (target / "shard-a1-00000.tar").exists()


def test_reingesting_kino_shards_keeps_each_cut_clip_whole(workspace, env, tmp_path):
    """A cut clip records its span as source_clip_span: ingesting the shards again does not cut it again."""
    import csv

    table = tmp_path / "spans.csv"
    rows = list(csv.DictReader(open(workspace / "meta.csv")))[:2]
    for row in rows:
        row["clip_span"] = "0.5,1.5"
    with open(table, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    cut = run(f"python -m data ingest --videos my_videos --metadata {table} --out {tmp_path / 'cut'}", workspace, env)
    assert cut.returncode == 0 and "ingested 2 samples" in cut.stdout, cut.stdout + cut.stderr
    again = run(f"python -m data ingest --video2dataset {tmp_path / 'cut'} --out {tmp_path / 'again'}", workspace, env)
    assert again.returncode == 0 and "ingested 2 samples" in again.stdout, again.stdout + again.stderr
    from data.tar_samples import TarSample, decode_sample, read_tar

    def metas(root):
        return [decode_sample(s)[2] for s in read_tar(root / "shard-00000.tar") if isinstance(s, TarSample)]

    for before, after in zip(metas(tmp_path / "cut"), metas(tmp_path / "again")):
        assert before["source_clip_span"] == after["source_clip_span"] == [0.5, 1.5]
        assert before["num_frames"] == after["num_frames"] and "clip_span" not in after


# ---------------------------------------------------------------------------------------- documented commands

DOCUMENTS = ["README.md", *sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").glob("*.md"))]
COMMAND_WORDS = ("python", "python3", "make", "kubectl", "printf", "cat", "ray", "bash", "source", "torchrun")

# Commands this machine cannot run in any form, and why.
NOT_HERE = {
    "kubectl": "needs a Kubernetes API server",
    "ray start": "starts a Ray head for a multi-host cluster",
    "source .gpu-kit/install.sh": "runs on the GPU machine, after the kit is built",
    "bash ../shared/gpu/wheelhouse.sh": "builds the GPU wheel kit from ../shared, outside the repository",
}
# Commands run whole by another test of the suite (which needs what this workspace does not have: base weights, a
# trained VAE), with the test that runs them.
RUN_ELSEWHERE = {
    "python -m train.export runs/wan_finetune --format diffusers":
        "tests/integration/test_wan.py::test_a_wan_finetune_from_base_weights_exports_to_diffusers_and_records_its_origin",
    "python -m train.export runs/vae_demo":
        "tests/integration/test_vae_method.py::test_vae_trains_exports_and_serves_as_the_dit_latent_space",
    "python benchmarks/vae_psnr.py":
        "tests/integration/test_vae_method.py::test_vae_trains_exports_and_serves_as_the_dit_latent_space",
}
# The same command with smaller numbers, or without the network.
SMALLER = [("--procedural 480", "--procedural 8"), ("--validation 24", "--validation 4"),
           ("python -m data.demo_set datasets/demo", "python -m data.demo_set datasets/demo --no-real --procedural 8")]
PLACEHOLDER = re.compile(r"^[A-Z][A-Z_]+(\.\.\.)?$")


def documented_commands():
    """(document, command line) of every shell command in a bash/sh/plain code block, continuations joined."""
    found = []
    for document in DOCUMENTS:
        text = (REPO / document).read_text()
        for block in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.S | re.M):
            if block.group(1) not in ("", "bash", "sh"):
                continue
            lines = block.group(2).splitlines()
            index = 0
            while index < len(lines):
                line = lines[index].strip()
                index += 1
                if not line or line.split()[0] not in COMMAND_WORDS:
                    continue
                while line.endswith("\\") and index < len(lines):
                    line = line[:-1].rstrip() + " " + lines[index].strip()
                    index += 1
                if "<<" in line:  # a heredoc: the lines up to its terminator belong to it
                    terminator = line.split("<<", 1)[1].strip().strip("'\"")
                    body = []
                    while index < len(lines) and lines[index].strip() != terminator:
                        body.append(lines[index])
                        index += 1
                    index += 1
                    line = "\n".join([line, *body, terminator])
                found.append((document, line))
    return found


def runnable_form(line: str):
    """What this machine runs for a documented command: (form, cwd 'workspace'|'repo'), or (None, reason)."""
    for prefix, reason in NOT_HERE.items():
        if line.startswith(prefix):
            return None, reason
    for prefix, test in RUN_ELSEWHERE.items():
        if line.startswith(prefix):
            return None, f"run by {test}"
    words = shlex.split(line, comments=True)
    if words[0] not in ("python", "python3", "make"):
        return line, "workspace"  # a shell line (printf > hostfile, a heredoc): as written
    if any(PLACEHOLDER.match(w.split("=")[-1]) or "|" in w or w.startswith("[") for w in words) or "..." in words[1:-1]:
        # a synopsis (DIR, OUT, [--option], a|b): its entry point must answer --help
        entry = words[:3] if words[1] == "-m" else words[:2]
        if entry[-1] == "data":
            entry.append(words[3])
        return shlex.join([*entry, "--help"]), "workspace"
    words = [w for w in words if w != "..."]
    if words[0] == "make":
        return shlex.join(["make", "-n", *words[1:]]), "repo"
    if words[0] in ("python", "python3") and words[1].startswith("benchmarks/"):
        return shlex.join([words[0], words[1], "--help"]), "repo"  # GPU benchmarks (docs/gpu.md)
    if words[:3] in (["python", "-m", "launch"], ["python3", "-m", "launch"]):
        words = [w for w in words if w not in ("--apply", "--dry-run")]
        words.insert(4, "--dry-run")
    elif words[:3] in (["python", "-m", "train"], ["python3", "-m", "train"]) and "--dry-run" not in words:
        words.insert(3, "--dry-run")  # training is what the rest of the suite runs
    line = shlex.join(words)
    for before, after in SMALLER:
        line = line.replace(before, after)
    return line, "workspace"


def test_every_documented_command_is_found():
    """Guards the extraction: the commands of each kind the documents hold today are all seen."""
    found = [line for _, line in documented_commands()]
    assert len(found) >= 55
    for expected in ("make demo", "python -m data ingest --videos my_videos/ --metadata meta.csv --out datasets/mine",
                     "python3 benchmarks/profile_step.py --model 1B --tokens 16384",
                     "python -m launch slurm --dry-run model=B curriculum=t2v_3stage zero.precision=bf16 "
                     "launcher.nodes=4"):
        assert any(line.startswith(expected) for line in found), expected
    assert any(line.startswith("cat > hostfile <<EOF\ngpu-node-1 slots=8") for line in found)


def test_commands_run_elsewhere_name_tests_that_exist():
    for node in RUN_ELSEWHERE.values():
        path, name = node.split("::")
        assert f"def {name}(" in (REPO / path).read_text(), node


def test_every_documented_command_works(workspace, env):
    failures, ran = [], 0
    for document, line in documented_commands():
        form, where = runnable_form(line)
        if form is None:
            continue
        result = run(form, workspace if where == "workspace" else REPO, env, timeout=600)
        ran += 1
        output = result.stdout + result.stderr
        if result.returncode != 0 or "Traceback" in output:
            failures.append(f"{document}: {form}\n  exit {result.returncode}: {output.strip()[-1500:]}")
    assert not failures, "\n\n".join(failures)
    assert ran >= 50
    assert (workspace / "samples").is_dir() and list((workspace / "samples").glob("*.mp4"))  # README's generate
    assert (workspace / "datasets" / "mine-latents" / "manifest.json").exists()  # README's encode
