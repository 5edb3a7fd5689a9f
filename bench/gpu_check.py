"""`make gpu-check`: every check that needs an NVIDIA GPU, in one command; prints one JSON object.

1. setup: a virtual environment of its own (default .venv-gpu) with the CUDA build of jax
   (jax[cuda13]==0.10.2), jax-triton, the pinned runtime requirements and pytest; lin_llm is
   installed into it in editable mode. A stamp keeps a finished setup for the next run.
2. device: JAX must see a GPU there, or the run stops (nothing is silently run on the CPU).
3. pallas_tests: tests/test_pallas.py with LIN_LLM_PALLAS_COMPILED=1, so every kernel case runs
   compiled for the GPU (Triton) instead of in the interpreter.
4. pallas_scan: bench/pallas_scan.py at a LLaMA-2-7B attention layer (B=1, 32 heads, head dim
   128, bf16), forward and forward+backward: the kernels against the XLA chunked form and
   softmax attention (cuDNN flash and XLA), T = 2k..8k.
5. decode: bench/decode.py --device-only: plain decoding of the MHA/GQA/MQA tiny models, batched
   decoding and prefill throughput, latency against context, and the real model when
   --real-model exists (without transformers' CPU comparison, which the CPU run reports).

Each stage runs under its own time limit so that the whole stays within about 10 minutes on one
H100/H200; a failed or timed-out stage is reported with the tail of its output and the later
stages still run. On a machine without a GPU it stops after the device stage, saying so.

    python bench/gpu_check.py [--venv .venv-gpu] [--python python3] [--real-model DIR] [--skip-setup]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GPU_PACKAGES = ["jax[cuda13]==0.10.2", "jax-triton", "pytest"]
# seconds per stage: setup downloads ~2 GB of CUDA wheels; the kernel tests compile ~60 Triton kernels
LIMITS = {"setup": 240, "device": 60, "pallas_tests": 150, "pallas_scan": 90, "decode": 150}


def _run(cmd, limit, env=None):
    """(return code or "timeout", seconds, combined output) of a command run from the repository root."""
    start = time.perf_counter()
    try:
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=limit)
        code, out = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as e:
        code = "timeout"
        out = (e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(errors="replace")
    return code, round(time.perf_counter() - start, 1), out


def _stage(report, name, cmd, env=None):
    code, seconds, out = _run(cmd, LIMITS[name], env)
    report["stages"][name] = {"ok": code == 0, "returncode": code, "seconds": seconds, "limit_s": LIMITS[name]}
    if code != 0:
        report["stages"][name]["output_tail"] = out[-3000:]
    return code == 0, out


def setup(report, venv: Path, python: str, skip: bool) -> Path:
    """The environment's interpreter, created and filled unless already there (or --skip-setup)."""
    py = venv / "bin" / "python"
    wanted = "\n".join(GPU_PACKAGES) + (ROOT / "requirements.txt").read_text() + (ROOT / "pyproject.toml").read_text()
    stamp = venv / ".gpu-check-installed"
    digest = hashlib.sha256(wanted.encode()).hexdigest()
    if skip or (stamp.exists() and stamp.read_text() == digest):
        report["stages"]["setup"] = {"ok": py.exists(), "skipped": True, "venv": str(venv)}
        return py
    script = " && ".join([
        f"{python} -m venv {venv}",
        f"{py} -m pip install --quiet --upgrade pip",
        f"{py} -m pip install --quiet -r requirements.txt " + " ".join(f"'{p}'" for p in GPU_PACKAGES),
        f"{py} -m pip install --quiet --no-deps -e .",
    ])
    ok, _ = _stage(report, "setup", ["bash", "-c", script])
    if ok:
        stamp.write_text(digest)
    report["stages"]["setup"]["venv"] = str(venv)
    return py


def device(report, py: Path) -> bool:
    probe = ("import jax, json; "
             "print(json.dumps([jax.default_backend(), str(jax.devices()[0].device_kind), jax.__version__]))")
    ok, out = _stage(report, "device", [str(py), "-c", probe])
    if not ok:
        return False
    backend, kind, version = json.loads(out.strip().splitlines()[-1])
    report["device"] = {"backend": backend, "device_kind": kind, "jax": version}
    if backend != "gpu":
        report["stages"]["device"].update(ok=False, error=f"JAX sees no GPU here (backend {backend!r})")
        return False
    return True


def pallas_tests(report, py: Path, tmp: Path):
    junit = tmp / "pallas.xml"
    env = {**os.environ, "LIN_LLM_PALLAS_COMPILED": "1"}
    _stage(report, "pallas_tests", [str(py), "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_pallas.py",
                                    f"--junitxml={junit}"], env)
    if junit.exists():
        import xml.etree.ElementTree as ET

        suite = ET.parse(junit).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        report["pallas_tests"] = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
        failed = [case.get("name") for case in suite.iter("testcase")
                  if case.find("failure") is not None or case.find("error") is not None]
        report["pallas_tests"]["failed"] = failed


def pallas_scan(report, py: Path, tmp: Path):
    out = tmp / "pallas_scan.json"
    ok, _ = _stage(report, "pallas_scan", [str(py), "bench/pallas_scan.py", "--lengths", "2048", "4096", "8192",
                                           "--repeats", "3", "--out", str(out)])
    if out.exists():
        report["pallas_scan"] = json.loads(out.read_text())


def decode(report, py: Path, tmp: Path, real_model: str | None):
    cmd = [str(py), "bench/decode.py", "--device-only", "--out", str(tmp / "decode")]
    if real_model:
        cmd += ["--real-model", real_model]
    _stage(report, "decode", cmd)
    result = tmp / "decode" / "decode.json"
    if result.exists():
        report["decode"] = json.loads(result.read_text())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--venv", default=".venv-gpu", help="the GPU environment (created if missing)")
    parser.add_argument("--python", default=sys.executable, help="interpreter that creates the environment")
    parser.add_argument("--real-model", default="runs/quickstart/teacher", help="lin_llm checkpoint to decode, if present")
    parser.add_argument("--skip-setup", action="store_true", help="use --venv as it is")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    report = {"check": "gpu", "stages": {}}
    venv = (ROOT / args.venv).resolve()
    py = setup(report, venv, args.python, args.skip_setup)
    if report["stages"]["setup"]["ok"] and device(report, py):
        real = args.real_model if (ROOT / args.real_model).exists() else None
        report["real_model"] = real or f"{args.real_model} (not found: skipped)"
        with tempfile.TemporaryDirectory() as tmp:
            pallas_tests(report, py, Path(tmp))
            pallas_scan(report, py, Path(tmp))
            decode(report, py, Path(tmp), real)
    report["seconds"] = round(time.perf_counter() - started, 1)
    report["ok"] = all(stage["ok"] for stage in report["stages"].values())
    print(json.dumps(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
