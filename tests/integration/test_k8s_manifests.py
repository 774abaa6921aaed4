"""Kubernetes manifests from `python -m launch k8s`, validated offline against the real schemas.

No API server can run here, so nothing is applied: built-in kinds (the Service, and the Job and pod
templates inside the custom resources) go through `kubernetes-validate --strict`; JobSet and PyTorchJob
go through jsonschema with their projects' CRD schemas, unknown fields rejected.
"""
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

# The project's shared CRD schemas sit beside the checkout (../shared); a clone elsewhere finds them at
# the workspace's fixed path, or wherever KINO_K8S_CRDS points.
CRD_CANDIDATES = [REPO.parent / "shared" / "k8s-crds", Path("/work/shared/k8s-crds")]
CRD_DIR = Path(os.environ["KINO_K8S_CRDS"]) if os.environ.get("KINO_K8S_CRDS") else next(
    (d for d in CRD_CANDIDATES if d.is_dir()), CRD_CANDIDATES[0])
CRD_FILES = {"JobSet": "jobset.x-k8s.io_jobsets.yaml", "PyTorchJob": "kubeflow.org_pytorchjobs.yaml"}
MODEL = ["model=B", "curriculum=t2v_3stage", "zero.precision=bf16", "model.activation_checkpointing=true"]
CLUSTER = ["launcher.nodes=4", "launcher.gpus_per_node=8", "launcher.memory=500Gi",
           "launcher.k8s.image=registry.example.com/kino:0.1.0", "launcher.k8s.volume_claim=kino-shared",
           "launcher.k8s.namespace=video", "launcher.k8s.service_account=trainer",
           "+launcher.k8s.node_selector.gpu=h100", "launcher.k8s.priority_class=preemptible",
           "launcher.k8s.storage_secret=kino-s3", "tracking.mode=online", "train.experiment=t2v_b"]
needs_crds = pytest.mark.skipif(not all((CRD_DIR / f).exists() for f in CRD_FILES.values()),
                                reason=f"CRD schemas not found in {CRD_DIR} (set KINO_K8S_CRDS to their directory)")


def render(tmp_path: Path, api: str, env=None) -> subprocess.CompletedProcess:
    """The real CLI, writing the manifest into a run directory under tmp_path."""
    done = subprocess.run([sys.executable, "-m", "launch", "k8s", *MODEL, *CLUSTER, f"launcher.k8s.api={api}",
                           f"train.run_dir={tmp_path / 'run'}"], cwd=REPO, capture_output=True, text=True,
                          env=env or dict(os.environ))
    assert done.returncode == 0, done.stderr
    return done


def manifest(tmp_path: Path, api: str) -> Path:
    render(tmp_path, api)
    (path,) = (tmp_path / "run" / "k8s").glob(f"*.{api}.yaml")
    return path


def strict(schema):
    """CRD schemas leave objects open; the API server prunes unknown fields. Close every object that lists
    its properties, so a misspelt field fails here instead of vanishing silently on apply."""
    if isinstance(schema, dict):
        schema = {key: strict(value) for key, value in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema \
                and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    return schema


def crd_validator(kind: str):
    import jsonschema

    crd = yaml.safe_load((CRD_DIR / CRD_FILES[kind]).read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v.get("served")]
    return version["name"], jsonschema.Draft7Validator(strict(version["schema"]["openAPIV3Schema"]))


def kubernetes_validate(documents, tmp_path: Path, name: str) -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump_all(documents))
    tool = Path(sys.executable).parent / "kubernetes-validate"
    done = subprocess.run([str(tool), "--strict", str(path)], capture_output=True, text=True)
    output = done.stdout + done.stderr
    # It exits 0 with a WARN for a kind it has no schema for: that must fail here.
    assert done.returncode == 0 and "WARN" not in output and "ERROR" not in output, output
    assert output.count("passed") == len(documents), output
    return output


def builtin_parts(document):
    """The built-in objects a custom resource embeds, as stand-alone objects kubernetes-validate knows."""
    meta = {"name": document["metadata"]["name"], "namespace": document["metadata"]["namespace"]}
    if document["kind"] == "JobSet":
        for replicated in document["spec"]["replicatedJobs"]:
            yield {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta, "spec": replicated["template"]["spec"]}
    else:
        for replica in document["spec"]["pytorchReplicaSpecs"].values():
            yield {"apiVersion": "v1", "kind": "PodTemplate", "metadata": meta, "template": replica["template"]}


@needs_crds
@pytest.mark.parametrize("api,kind", [("jobset", "JobSet"), ("pytorchjob", "PyTorchJob")])
def test_manifests_pass_the_crd_schema_and_kubernetes_validate_strict(tmp_path, api, kind):
    documents = list(yaml.safe_load_all(manifest(tmp_path, api).read_text()))
    custom = [d for d in documents if d["kind"] == kind]
    builtin = [d for d in documents if d["kind"] != kind]
    assert len(custom) == 1
    version, validator = crd_validator(kind)
    assert custom[0]["apiVersion"].endswith("/" + version)
    errors = [f"{'.'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(custom[0])]
    assert not errors, errors
    kubernetes_validate(builtin + list(builtin_parts(custom[0])), tmp_path, api)


@needs_crds
def test_the_schema_checks_can_fail(tmp_path):
    """A misspelt field, in the custom resource or in an embedded pod spec, is caught by each check."""
    service, jobset = yaml.safe_load_all(manifest(tmp_path, "jobset").read_text())
    jobset["spec"]["failurePolicy"]["maxRestart"] = 3
    _, validator = crd_validator("JobSet")
    assert any("maxRestart" in e.message for e in validator.iter_errors(jobset))
    (job,) = builtin_parts(jobset)
    job["spec"]["template"]["spec"]["containers"][0]["gpus"] = 8
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(job))
    done = subprocess.run([str(Path(sys.executable).parent / "kubernetes-validate"), "--strict", str(path)],
                          capture_output=True, text=True)
    assert done.returncode != 0 and "gpus" in done.stdout + done.stderr


def test_no_secret_value_reaches_a_rendered_file_or_the_log(tmp_path):
    key = "wandb-" + secrets.token_hex(16)
    env = dict(os.environ, WANDB_API_KEY=key, KINO_TEST_TOKEN=key)
    outputs = []
    for api in ("jobset", "pytorchjob"):
        done = render(tmp_path, api, env)
        outputs += [done.stdout, done.stderr]
    slurm = subprocess.run([sys.executable, "-m", "launch", "slurm", "--dry-run", *MODEL, *CLUSTER,
                            f"train.run_dir={tmp_path / 'run'}"], cwd=REPO, capture_output=True, text=True, env=env)
    assert slurm.returncode == 0, slurm.stderr
    outputs += [slurm.stdout, slurm.stderr]
    rendered = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    assert len(rendered) == 2
    for path in rendered:
        text = path.read_text()
        assert key not in text, path
        assert "secretKeyRef" in text  # the key travels by reference only
        if path.suffix == ".yaml":  # the bucket's credentials too: every key of the Secret, by reference
            assert "secretRef:\n" in text and "name: kino-s3" in text, path
    assert all(key not in output for output in outputs)


def test_a_job_whose_data_lives_on_the_cluster_renders_where_that_data_is_not(tmp_path):
    """Paths are the pods' (a volume claim): `launch k8s` and `launch slurm` render a job whose cache and base
    weights do not exist here. `launch local` checks the same paths, which are this machine's, and refuses."""
    on_cluster = ["data.root=/shared/videos", "data.latents=/shared/latents"]
    render_here = [sys.executable, "-m", "launch", "k8s", *MODEL, *CLUSTER, "launcher.k8s.api=jobset",
                   f"train.run_dir={tmp_path / 'run'}", *on_cluster]
    done = subprocess.run(render_here, cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "data.latents=/shared/latents" in next((tmp_path / "run" / "k8s").glob("*.jobset.yaml")).read_text()
    local = subprocess.run([sys.executable, "-m", "launch", "local", *MODEL, *on_cluster,
                            f"train.run_dir={tmp_path / 'local'}"], cwd=REPO, capture_output=True, text=True)
    assert local.returncode == 2 and "data.latents=/shared/latents: no manifest.json" in local.stderr, local.stderr
    assert "torch.distributed.run" not in local.stdout  # refused before torchrun starts
