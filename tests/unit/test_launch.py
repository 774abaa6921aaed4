"""launch/: plans, rendered scripts and commands (no scheduler needed; the real SLURM and K8s checks are in
tests/integration/test_slurm.py and test_k8s_manifests.py)."""
import os
import signal
import subprocess
import sys

import pytest
import yaml

from launch import hostfile, k8s, local, slurm
from launch.__main__ import main as launch_main
from launch.node import parse_args, torchrun_command
from launch.plan import LaunchError, make_plan
from tests.conftest import REPO
from conf.schema import load_config
from train.preemption import EXIT_PREEMPTED, StopRequest

CPU2 = ["experiment=demo", "launcher.nodes=2", "launcher.procs_per_node=1"]
GPU = ["zero.precision=bf16", "model.activation_checkpointing=true", "launcher.nodes=4", "launcher.gpus_per_node=8",
       "launcher.k8s.image=registry.example/kino:1",
       "launcher.k8s.volume_claim=shared"]


def test_bad_config_is_refused_before_anything_starts(capsys):
    assert launch_main(["slurm", "--dry-run", "zero.stage=7"]) == 2
    assert "zero.stage=7" in capsys.readouterr().err
    assert launch_main(["local", "launcher.nodes=2"]) == 2
    assert "launch local" in capsys.readouterr().err
    assert launch_main(["teleport"]) == 2


def test_secrets_are_refused_in_launcher_env_which_is_written_into_scripts(capsys):
    assert launch_main(["slurm", "--dry-run", *CPU2, "+launcher.env.WANDB_API_KEY=abc123"]) == 2
    error = capsys.readouterr()
    assert "launcher.env.WANDB_API_KEY" in error.err and "abc123" not in error.out
    assert launch_main(["slurm", "--dry-run", *CPU2, "+launcher.env.NCCL_DEBUG=INFO"]) == 0
    assert "export NCCL_DEBUG=INFO" in capsys.readouterr().out


def test_schedulers_refuse_a_run_that_would_restart_from_scratch_after_each_requeue():
    with pytest.raises(LaunchError, match="train.resume=false"):
        make_plan("slurm", [*CPU2, "train.resume=false"])


def test_memory_check_refuses_what_cannot_fit_and_reports_what_fits():
    plan = make_plan("slurm", ["model=B", "curriculum=t2v_3stage", *GPU, "launcher.gpu_type=H100"])
    assert "fits" in plan.memory_report and "GiB per GPU of 80 GiB" in plan.memory_report
    with pytest.raises(LaunchError, match="does not fit"):
        make_plan("slurm", ["model=7B", "curriculum=t2v_3stage", "zero=stage1", "launcher.nodes=1",
                            "launcher.gpus_per_node=1",
                            "launcher.gpu_type=A100-40"])
    assert "skipped" in make_plan("slurm", CPU2).memory_report  # CPU demo: no GPUs requested


def test_sbatch_script_has_the_requested_resources_and_preemption_trap(tmp_path):
    plan = make_plan("slurm", [*CPU2, "launcher.slurm.partition=gpu", "launcher.slurm.account=proj",
                               "launcher.slurm.qos=high", "launcher.slurm.preempt_signal_s=120",
                               "launcher.time_limit=01:00:00", "launcher.slurm.setup=[module load cuda/12.4]"])
    script = slurm.render(plan, tmp_path / "job.sbatch", tmp_path / "logs")
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --partition=gpu",
                 "#SBATCH --account=proj", "#SBATCH --qos=high", "#SBATCH --signal=B:USR1@120",
                 "#SBATCH --requeue", "#SBATCH --time=01:00:00", f"#SBATCH --output={tmp_path}/logs/%x-%j.out",
                 "module load cuda/12.4", "trap on_preemption_warning USR1", 'scontrol requeue "$SLURM_JOB_ID"',
                 "--node-rank-from=SLURM_NODEID", "-- experiment=demo launcher.nodes=2"):
        assert line in script, line
    assert "--gpus-per-node" not in script  # a CPU run asks for no GPUs
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    gpu = slurm.render(make_plan("slurm", ["model=B", "curriculum=t2v_3stage", *GPU]), tmp_path / "j", tmp_path / "l")
    assert "#SBATCH --gpus-per-node=8" in gpu and "--procs=8" in gpu


def test_node_agent_runs_the_same_entry_with_c10d_rendezvous_and_owns_the_ray_address():
    args = parse_args(["--nodes=2", "--procs=4", "--head=n1", "--node-rank=0", "--rdzv-port=29600",
                       "--ray-port=6400", "--", "experiment=demo", "data.ray_address=elsewhere:1"])
    head, worker = torchrun_command(args, 0), torchrun_command(args, 1)
    for words in (head, worker):
        assert words[1:3] == ["-m", "torch.distributed.run"]
        assert {"--nnodes=2", "--nproc-per-node=4", "--rdzv-backend=c10d", "--rdzv-endpoint=n1:29600"} <= set(words)
        assert words[words.index("-m", 3):][:3] == ["-m", "train", "experiment=demo"]
        assert words[-2:] == ["data.coordinator=ray", "data.ray_address=n1:6400"]
        assert "data.ray_address=elsewhere:1" not in words
    assert "--rdzv-conf=is_host=true" in head and "--rdzv-conf=is_host=false" in worker


def test_local_uses_this_machines_gpus_unless_told(monkeypatch):
    import launch.plan

    monkeypatch.setattr(launch.plan, "_visible_gpus", lambda: 0)  # this CPU machine
    plan = make_plan("local", [])
    assert plan.procs_per_node == 1 and "skipped" in plan.memory_report
    monkeypatch.setattr(launch.plan, "_visible_gpus", lambda: 4)  # stands in for a 4-GPU box (no GPU here)
    assert make_plan("local", []).procs_per_node == 4
    assert make_plan("local", ["launcher.procs_per_node=2"]).procs_per_node == 2


def test_apply_without_kubectl_says_where_the_manifest_is(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PATH", str(tmp_path))  # no kubectl on it
    code = launch_main(["k8s", "--apply", "launcher.k8s.image=x", "launcher.k8s.volume_claim=y",
                        f"train.run_dir={tmp_path / 'run'}"])
    assert code == 2 and "kubectl not found" in capsys.readouterr().err
    assert list((tmp_path / "run" / "k8s").glob("*.jobset.yaml"))


def test_local_and_deepspeed_commands(tmp_path):
    words = local.command(make_plan("local", ["experiment=demo"]))
    assert words[1:] == ["-m", "launch.torchrun", "--standalone", "--nproc-per-node=2",
                         "--shutdown-timeout=600", "-m", "train",
                         "experiment=demo"]
    hosts = tmp_path / "hostfile"
    hosts.write_text("# two machines\nworker-1 slots=8\nworker-2 slots=8\n")
    plan = make_plan("deepspeed", ["experiment=demo", f"launcher.hostfile={hosts}", "data.ray_address=worker-1:6379"])
    assert plan.nodes == 2
    words = hostfile.command(plan)
    assert f"--hostfile={hosts}" in words and "--master_addr=worker-1" in words
    assert words[words.index("--module"):][:3] == ["--module", "train", "experiment=demo"]
    assert "--no_local_rank" in words  # ranks read LOCAL_RANK from the environment
    with pytest.raises(LaunchError, match="data.ray_address"):
        hostfile.command(make_plan("deepspeed", ["experiment=demo", f"launcher.hostfile={hosts}"]))
    hosts.write_text("worker-1 8\n")
    with pytest.raises(LaunchError, match="HOST slots=N"):
        hostfile.read_hostfile(str(hosts))
    with pytest.raises(LaunchError, match="cannot read"):
        make_plan("deepspeed", ["experiment=demo", f"launcher.hostfile={tmp_path / 'missing'}"])


def test_k8s_jobset_rendezvous_resources_and_restart_policy():
    plan = make_plan("k8s", ["model=B", "curriculum=t2v_3stage", *GPU, "tracking.mode=online", "launcher.memory=500Gi"])
    service, jobset = yaml.safe_load_all(k8s.render(plan))
    assert service["kind"] == "Service" and service["spec"]["clusterIP"] == "None"
    assert jobset["kind"] == "JobSet" and jobset["spec"]["network"]["subdomain"] == service["metadata"]["name"]
    assert jobset["spec"]["failurePolicy"]["maxRestarts"] == 20
    job = jobset["spec"]["replicatedJobs"][0]["template"]["spec"]
    assert job["parallelism"] == job["completions"] == 4 and job["completionMode"] == "Indexed"
    pod = job["template"]["spec"]
    container = pod["containers"][0]
    assert "--head=kino-default-node-0-0.kino-default" in container["command"]
    assert "--node-rank-from=JOB_COMPLETION_INDEX" in container["command"]
    assert container["resources"]["limits"] == {"nvidia.com/gpu": 8}
    assert {"name": "workspace", "persistentVolumeClaim": {"claimName": "shared"}} in pod["volumes"]
    key = [e for e in container["env"] if e["name"] == "WANDB_API_KEY"][0]
    assert key == {"name": "WANDB_API_KEY", "valueFrom": {"secretKeyRef": {"name": "wandb", "key": "api-key"}}}
    offline = make_plan("k8s", ["model=B", "curriculum=t2v_3stage", *GPU])  # no W&B key needed offline
    assert "WANDB_API_KEY" not in k8s.render(offline)
    whole_node = make_plan("k8s", ["model=B", "curriculum=t2v_3stage", *GPU, "launcher.memory=0"])
    _, whole_node_jobset = yaml.safe_load_all(k8s.render(whole_node))
    pod_spec = whole_node_jobset["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
    assert "memory" not in pod_spec["containers"][0]["resources"]["requests"]  # SLURM's "0" = whole node
    assert container["resources"]["requests"]["memory"] == "500Gi"


def test_k8s_pytorchjob_master_and_workers():
    plan = make_plan("k8s", ["model=B", "curriculum=t2v_3stage", *GPU, "launcher.k8s.api=pytorchjob"])
    (job,) = yaml.safe_load_all(k8s.render(plan))
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1 and replicas["Worker"]["replicas"] == 3
    command = replicas["Worker"]["template"]["spec"]["containers"][0]["command"]
    assert "--head=kino-default-master-0" in command and "--node-rank-from=RANK" in command


def test_k8s_name_sets_every_dns_name_and_must_be_a_dns_label():
    plan = make_plan("k8s", ["launcher.k8s.image=x", "launcher.k8s.volume_claim=y", "launcher.k8s.name=t2v-b-1"])
    service, jobset = yaml.safe_load_all(k8s.render(plan))
    assert service["metadata"]["name"] == jobset["metadata"]["name"] == "t2v-b-1"
    command = jobset["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]["containers"][0]["command"]
    assert "--head=t2v-b-1-node-0-0.t2v-b-1" in command
    with pytest.raises(LaunchError, match="DNS label"):
        k8s.render(make_plan("k8s", ["launcher.k8s.image=x", "launcher.k8s.volume_claim=y", "launcher.k8s.name=T2V_b"]))


def test_k8s_needs_an_image_and_a_shared_volume():
    with pytest.raises(LaunchError, match="launcher.k8s.image"):
        k8s.render(make_plan("k8s", ["launcher.k8s.volume_claim=x"]))
    with pytest.raises(LaunchError, match="volume_claim"):
        k8s.render(make_plan("k8s", ["launcher.k8s.image=x"]))


def test_stop_request_from_the_batch_scripts_file_is_a_clean_stop(tmp_path):
    flag = tmp_path / "stop"
    request = StopRequest(torch_device(), stop_file=str(flag))
    assert not request.agreed()
    flag.touch()
    assert request.agreed() and "stop file" in request.reason and request.exit_status() == 0


def run_trap(tmp_path, train: str = "") -> subprocess.CompletedProcess:
    """The rendered USR1 trap on its own, with `scontrol` stubbed and `train` as the training step."""
    plan = make_plan("slurm", [*CPU2, f"train.run_dir={tmp_path / 'run'}"])
    script = slurm.render(plan, tmp_path / "job.sbatch", tmp_path / "logs")
    trap = script[script.index("train_pid=\"\""):script.index("trap on_preemption_warning USR1")]
    probe = (f"KINO_STOP_FILE={tmp_path}/stop\nscontrol() {{ echo scontrol \"$@\"; }}\nset -u\n{trap}"
             f"trap on_preemption_warning USR1\n{train}\nkill -USR1 $$\nwait\necho not reached\n")
    return subprocess.run(["bash", "-c", probe], capture_output=True, text=True, env={"SLURM_JOB_ID": "7"})


def test_sbatch_trap_requeues_after_the_checkpoint_and_only_then(tmp_path):
    # USR1 before training started (no pid yet): nothing to wait for, requeue.
    done = run_trap(tmp_path)
    assert done.returncode == 0 and "scontrol requeue 7" in done.stdout, done.stdout + done.stderr
    assert "not reached" not in done.stdout and not (tmp_path / "stop").exists()
    # Training that stops cleanly on the stop file: waited for, then requeued.
    done = run_trap(tmp_path, f"(while [ ! -e {tmp_path}/stop ]; do sleep 0.1; done; exit 0) & train_pid=$!")
    assert "scontrol requeue 7" in done.stdout, done.stdout + done.stderr
    # Training that fails: its status, no requeue (a crash would otherwise loop).
    done = run_trap(tmp_path, "(sleep 0.5; exit 3) & train_pid=$!")
    assert done.returncode == 3 and "scontrol" not in done.stdout
    # A run already at its last step: nothing to requeue.
    latest = tmp_path / "run" / "checkpoints" / "latest"
    latest.parent.mkdir(parents=True)
    latest.write_text(f"step_{load_config(CPU2).total_steps}")  # the demo's last step
    done = run_trap(tmp_path)
    assert done.returncode == 0 and "scontrol" not in done.stdout and "finished" in done.stdout


def test_stop_request_from_a_signal_exits_75_so_the_scheduler_restarts_it():
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        request = StopRequest(torch_device(), stop_file="")
        os.kill(os.getpid(), signal.SIGTERM)
        assert request.agreed() and request.reason == "SIGTERM" and request.exit_status() == EXIT_PREEMPTED
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def test_cli_help_lists_the_schedulers():
    for args in (["--help"], ["slurm", "--help"]):
        done = subprocess.run([sys.executable, "-m", "launch", *args], cwd=REPO, capture_output=True, text=True)
        assert done.returncode == 0 and all(name in done.stdout for name in ("local", "slurm", "k8s", "deepspeed"))


def torch_device():
    import torch

    return torch.device("cpu")
