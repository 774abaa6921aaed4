"""`python -m launch k8s`: manifests for a JobSet (primary) or a Kubeflow PyTorchJob.

Every pod runs the node agent (launch/node.py), exactly as a SLURM task does: the Ray head in the first
pod, Ray workers in the others, and torchrun with c10d rendezvous at the first pod's DNS name. A failure
or an eviction restarts the whole set of pods (JobSet failurePolicy / PyTorchJob backoffLimit); every
restart resumes from `latest` on the shared volume. On eviction the pods get SIGTERM and
`termination_grace_s` to checkpoint (train/preemption.py).

Secrets: the W&B key reaches pods through a secretKeyRef, object-storage credentials through envFrom a Secret
(launcher.k8s.storage_secret); no secret value is ever read here.
"""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, Dict, List

import yaml

from launch.plan import LaunchError, LaunchPlan, workdir

CONTAINER = "pytorch"  # the Training Operator requires this container name; JobSet accepts any
NODE_JOB = "node"  # JobSet replicated job name: pods are <name>-node-0-<i>


def job_name(plan: LaunchPlan) -> str:
    return plan.cfg.launcher.k8s.name or plan.name


def _labels(plan: LaunchPlan) -> Dict[str, str]:
    return {"app.kubernetes.io/name": "kino", "app.kubernetes.io/instance": job_name(plan),
            "kino.dev/experiment": plan.name[len("kino-"):] or "default"}


def _env(plan: LaunchPlan) -> List[Dict[str, Any]]:
    k8s = plan.cfg.launcher.k8s
    env: List[Dict[str, Any]] = [{"name": "KINO_LAUNCHER", "value": "k8s"},
                                 {"name": "PYTHONUNBUFFERED", "value": "1"}]
    if plan.cfg.tracking.mode == "online":
        env.append({"name": "WANDB_API_KEY", "valueFrom": {"secretKeyRef": {
            "name": k8s.wandb_secret, "key": k8s.wandb_secret_key}}})
    env += [{"name": key, "value": str(value)} for key, value in sorted(plan.cfg.launcher.env.items())]
    return env


def _node_command(plan: LaunchPlan, head: str, rank_env: str) -> List[str]:
    launcher = plan.cfg.launcher
    return ["python", "-m", "launch.node", f"--nodes={plan.nodes}", f"--procs={plan.procs_per_node}",
            f"--head={head}", f"--node-rank-from={rank_env}", f"--rdzv-port={launcher.rdzv_port}",
            f"--ray-port={launcher.ray_port}", f"--ray-cpus={max(1, launcher.cpus_per_node // 8)}",
            f"--ray-object-store-mb={launcher.ray_object_store_mb}", f"--run-id={job_name(plan)}",
            f"--stop-grace={max(30, launcher.k8s.termination_grace_s - 30)}", "--", *plan.overrides]


def pod_template(plan: LaunchPlan, head: str, rank_env: str, rdzv_port_name: str = "rendezvous") -> Dict:
    launcher, k8s = plan.cfg.launcher, plan.cfg.launcher.k8s
    resources: Dict[str, Any] = {"requests": {"cpu": str(launcher.cpus_per_node)}}
    if launcher.memory and launcher.memory != "0":  # "0" is SLURM's "all of the node"; Kubernetes has no such request
        resources["requests"]["memory"] = launcher.memory
    if launcher.gpus_per_node:
        resources["limits"] = {k8s.gpu_resource: launcher.gpus_per_node}
    ports = [{"name": rdzv_port_name, "containerPort": launcher.rdzv_port},
             {"name": "ray", "containerPort": launcher.ray_port}]
    container = {"name": CONTAINER, "image": k8s.image, "imagePullPolicy": k8s.image_pull_policy,
                 "workingDir": k8s.mount_path, "command": _node_command(plan, head, rank_env), "env": _env(plan),
                 "ports": ports, "resources": resources,
                 **({"envFrom": [{"secretRef": {"name": k8s.storage_secret}}]} if k8s.storage_secret else {}),
                 "volumeMounts": [{"name": "workspace", "mountPath": k8s.mount_path},
                                  {"name": "dshm", "mountPath": "/dev/shm"}]}
    spec: Dict[str, Any] = {
        "terminationGracePeriodSeconds": k8s.termination_grace_s, "containers": [container],
        "volumes": [{"name": "workspace", "persistentVolumeClaim": {"claimName": k8s.volume_claim}},
                    {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": k8s.shm_size}}]}
    if k8s.service_account:
        spec["serviceAccountName"] = k8s.service_account
    if k8s.node_selector:
        spec["nodeSelector"] = dict(k8s.node_selector)
    if k8s.priority_class:
        spec["priorityClassName"] = k8s.priority_class
    return {"metadata": {"labels": _labels(plan)}, "spec": spec}


def _metadata(plan: LaunchPlan) -> Dict[str, Any]:
    return {"name": job_name(plan), "namespace": plan.cfg.launcher.k8s.namespace, "labels": _labels(plan)}


def jobset(plan: LaunchPlan) -> List[Dict[str, Any]]:
    """A headless Service (the pods' DNS domain, ready before the pods are) and the JobSet."""
    launcher = plan.cfg.launcher
    head = f"{job_name(plan)}-{NODE_JOB}-0-0.{job_name(plan)}"
    service = {"apiVersion": "v1", "kind": "Service", "metadata": _metadata(plan),
               "spec": {"clusterIP": "None", "publishNotReadyAddresses": True,
                        "selector": {"jobset.sigs.k8s.io/jobset-name": job_name(plan)},
                        "ports": [{"name": "rendezvous", "port": launcher.rdzv_port},
                                  {"name": "ray", "port": launcher.ray_port}]}}
    pod = pod_template(plan, head, "JOB_COMPLETION_INDEX")
    pod["spec"]["restartPolicy"] = "Never"  # a failed pod fails the JobSet attempt: all pods restart together
    job = {"apiVersion": "jobset.x-k8s.io/v1alpha2", "kind": "JobSet", "metadata": _metadata(plan),
           "spec": {"network": {"enableDNSHostnames": True, "subdomain": job_name(plan),
                                "publishNotReadyAddresses": True},
                    "failurePolicy": {"maxRestarts": launcher.k8s.max_restarts},
                    "replicatedJobs": [{"name": NODE_JOB, "replicas": 1, "template": {
                        "metadata": {"labels": _labels(plan)},
                        "spec": {"parallelism": plan.nodes, "completions": plan.nodes, "completionMode": "Indexed",
                                 "backoffLimit": 0, "template": pod}}}]}}
    return [service, job]


def pytorchjob(plan: LaunchPlan) -> List[Dict[str, Any]]:
    """The operator makes a headless Service per pod (<name>-master-0 is the head) and sets RANK per pod.
    A failed pod restarts in place (OnFailure); the other pods' torchrun then fails on the lost peer and
    their pods restart too, so all meet again at the rendezvous and resume from `latest`."""
    launcher = plan.cfg.launcher
    head = f"{job_name(plan)}-master-0"
    port = "pytorchjob-port"  # the operator's name for the port it exposes on each pod's Service
    replicas = {"Master": {"replicas": 1, "restartPolicy": "OnFailure",
                           "template": pod_template(plan, head, "RANK", port)}}
    if plan.nodes > 1:
        replicas["Worker"] = {"replicas": plan.nodes - 1, "restartPolicy": "OnFailure",
                              "template": pod_template(plan, head, "RANK", port)}
    return [{"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "metadata": _metadata(plan),
             "spec": {"runPolicy": {"backoffLimit": launcher.k8s.max_restarts, "cleanPodPolicy": "Running"},
                      "pytorchReplicaSpecs": replicas}}]


def render(plan: LaunchPlan) -> str:
    k8s = plan.cfg.launcher.k8s
    if not k8s.image:
        raise LaunchError("launcher.k8s.image is not set: name a container image with Kino installed")
    if not k8s.volume_claim:
        raise LaunchError("launcher.k8s.volume_claim is not set: name a ReadWriteMany PersistentVolumeClaim "
                          "holding the data and the run directory (every pod resumes from it)")
    name = job_name(plan)
    if not re.fullmatch(r"[a-z]([-a-z0-9]{0,43}[a-z0-9])?", name):
        raise LaunchError(f"launcher.k8s.name={name!r}: a DNS label of at most 45 characters (lower-case letters, "
                          "digits, '-'; pod host names add a suffix to it)")
    documents = jobset(plan) if k8s.api == "jobset" else pytorchjob(plan)
    header = (f"# Rendered by `python -m launch k8s` ({k8s.api}): {plan.nodes} pod(s) x {plan.procs_per_node} "
              f"process(es). Apply: kubectl apply -f <this file>\n")
    return header + yaml.safe_dump_all(documents, sort_keys=False, default_flow_style=False)


def manifest_path(plan: LaunchPlan) -> Path:
    return Path(workdir(plan.cfg)) / plan.run_dir / "k8s" / f"{job_name(plan)}.{plan.cfg.launcher.k8s.api}.yaml"


def run(plan: LaunchPlan, dry_run: bool, apply: bool) -> int:
    text = render(plan)
    if dry_run:
        print(text)
        return 0
    path = manifest_path(plan)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(f"manifests: {path}")
    if not apply:
        print(f"apply with: kubectl apply -f {path}   (or run again with --apply)")
        return 0
    if not shutil.which("kubectl"):
        raise LaunchError(f"kubectl not found; the manifests are in {path}")
    done = subprocess.run(["kubectl", "apply", "-f", str(path)])
    if done.returncode == 0:
        print(f"follow: kubectl -n {plan.cfg.launcher.k8s.namespace} logs -f -l "
              f"app.kubernetes.io/instance={job_name(plan)} --prefix --max-log-requests={plan.nodes + 1}")
        print(f"to launch this name again after it ended: kubectl delete -f {path}, then run this again "
              "(the run directory is kept; the new job resumes from `latest`)")
    return done.returncode
