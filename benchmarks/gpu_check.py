"""One command that checks a GPU machine: `python3 benchmarks/gpu_check.py` (or `make gpu-check`).

Runs, in this order, within about 5 minutes on one H100/H200:
  1. tests/gpu: the CUDA attention kernels against the reference, the packed DiT on CUDA, and the trainer
     end to end (`python -m train experiment=demo`, fp32 and bf16, 20 steps each, stopped and resumed,
     samples written);
  2. benchmarks/model_step.py at 1B x 16k tokens, bf16, against diffusers' Wan at equal width and depth;
then prints one markdown table (and writes it with the raw JSON under --out). Exit status 1 when a test
failed or a step did not finish, 0 otherwise.

Made for the GPU machine's plain `python3` with the wheel kit of ../shared/gpu (no .venv, no Ray, no
W&B); see docs/gpu.md. `--rehearse` runs the same steps on the CPU with a tiny model (the CUDA-only
kernel tests skip), so the check itself is exercised where no GPU is lent; its numbers mean nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]


def run(command: List[str], env: Dict[str, str], timeout: int) -> subprocess.CompletedProcess:
    print(f"\n$ {' '.join(command)}", flush=True)
    try:
        result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as expired:
        out = (expired.stdout or b"").decode(errors="replace") if isinstance(expired.stdout, bytes) else (expired.stdout or "")
        print(out[-3000:])
        return subprocess.CompletedProcess(command, 124, out, f"timed out after {timeout} s")
    print(result.stdout[-3000:], result.stderr[-3000:] if result.returncode else "", sep="\n", flush=True)
    return result


def environment() -> Dict[str, str]:
    import torch

    from models.attention import available_backends

    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": str(torch.version.cuda),
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (rehearsal)"}
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for dtype in (torch.bfloat16, torch.float32):
        info[f"attention {str(dtype).replace('torch.', '')}"] = available_backends(device, dtype)[0]
    try:
        import deepspeed

        info["deepspeed"] = deepspeed.__version__
    except ImportError:
        info["deepspeed"] = "missing"
    return info


def pytest_counts(junit: Path) -> Dict[str, object]:
    if not junit.exists():
        return {"passed": 0, "failed": 0, "skipped": 0, "errors": 1, "failures": ["pytest wrote no report"]}
    suite = ET.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    failures, skipped = [], 0
    for case in suite.iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            failures.append(case.get("name"))
        elif case.find("skipped") is not None:
            skipped += 1
    total = int(suite.get("tests", 0))
    return {"passed": total - len(failures) - skipped, "failed": len(failures), "skipped": skipped,
            "failures": failures}


def markdown(env_info, tests, trainers, step: Optional[dict], step_error: Optional[str], elapsed: float) -> str:
    lines = [f"## GPU check: {env_info['device']}, {time.strftime('%Y-%m-%d')}", "",
             "| what | result |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in env_info.items()]
    lines.append(f"| tests/gpu | {tests['passed']} passed, {tests['failed']} failed, {tests['skipped']} skipped"
                 + (f" ({', '.join(tests['failures'])})" if tests["failures"] else "") + " |")
    for report in trainers:
        lines.append(f"| trainer, experiment=demo, {report['precision']}, 1 process | {report['steps']} steps (resumed at "
                     f"{report['resumed_at']}), {report['tokens_per_s']:,.0f} tok/s, data wait "
                     f"{100 * report['data_wait_frac']:.1f}%, step {1000 * report['step_time_s']:.1f} ms, peak "
                     f"{report['peak_memory_gb']:.2f} GB, {report['samples']} samples |")
    if step is not None:
        mfu = f", MFU {100 * step['kino_mfu']:.1f}%" if step.get("kino_mfu") else ""
        lines.append(f"| model_step {step['model']} x {step['tokens']} tok, {step['dtype']}, attention "
                     f"{step['attention_backend']} | Kino {step['kino_tokens_per_s']:,.0f} tok/s{mfu}, "
                     f"{step['kino_step_s']:.3f} s/step |")
        if "diffusers_wan_tokens_per_s" in step:
            ratio = step["kino_tokens_per_s"] / step["diffusers_wan_tokens_per_s"]
            lines.append(f"| diffusers Wan, same dims | {step['diffusers_wan_tokens_per_s']:,.0f} tok/s; "
                         f"Kino / Wan = {ratio:.2f} |")
    elif step_error:
        lines.append(f"| model_step | failed: {step_error} |")
    lines.append(f"| wall time | {elapsed:.0f} s |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/gpu_check.py", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="write gpu_check.md and gpu_check.json here")
    parser.add_argument("--rehearse", action="store_true", help="run the steps on the CPU (tiny model)")
    parser.add_argument("--skip-benchmark", action="store_true", help="tests only")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    sys.path.insert(0, str(REPO))
    env_info = environment()
    print(json.dumps(env_info, indent=1), flush=True)
    work = Path(tempfile.mkdtemp(prefix="kino-gpu-check-"))
    env = dict(os.environ, KINO_GPU_REPORT_DIR=str(work), PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    if args.rehearse:
        env["KINO_GPU_CHECK_REHEARSAL"] = "1"
    junit = work / "junit.xml"
    tested = run([sys.executable, "-m", "pytest", "-q", "-ra", "-p", "no:cacheprovider", f"--junitxml={junit}",
                  "tests/gpu"], env, timeout=240)
    tests = pytest_counts(junit)
    if tested.returncode not in (0, 5) and not tests["failures"]:
        tests["failures"].append(f"pytest exit {tested.returncode}")
        tests["failed"] += 1
    trainers = [json.loads((work / f"trainer_{p}.json").read_text()) for p in ("fp32", "bf16")
                if (work / f"trainer_{p}.json").exists()]
    step, step_error = None, None
    if not args.skip_benchmark:
        size = ["--model", "tiny", "--tokens", "1024", "--dtype", "fp32", "--steps", "2", "--warmup", "1"] \
            if args.rehearse else ["--model", "1B", "--tokens", "16384", "--dtype", "bf16", "--steps", "10"]
        measured = run([sys.executable, "benchmarks/model_step.py", *size], env, timeout=240)
        try:
            step = json.loads(measured.stdout[measured.stdout.index("{"):])
        except ValueError:
            step_error = (measured.stderr.strip().splitlines() or ["no output"])[-1][:200]
    table = markdown(env_info, tests, trainers, step, step_error, time.perf_counter() - started)
    print("\n" + table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_check.md").write_text(table)
        (args.out / "gpu_check.json").write_text(json.dumps(
            {"environment": env_info, "tests": tests, "trainer": trainers, "model_step": step}, indent=1))
    return 1 if tests["failed"] or step_error or len(trainers) < 2 else 0


if __name__ == "__main__":
    sys.exit(main())
