"""GPU suite: one command for the first CUDA device, within 10 minutes on one H100.

    python benchmarks/gpu_suite.py -o gpu-suite [--cifar10 DIR] [--tiny DATASET]
    python benchmarks/gpu_suite.py -o smoke --smoke      # every step at toy size on the CPU

Steps, each in its own process under a time cap (a failing or overrunning step is recorded and
the suite goes on):

1. `cuda_tests`: `pytest tests/decode/test_cuda.py tests/test_device_auto.py` (passed/skipped counts).
2. `decode_throughput`: images/s of `D3Dataset` for each decoder family (small, medium, large; the
   paper's sizes) at 32 and 64 px, beside naive decoding and one training step of ConvNet-D3/D4
   and ResNet-18 on batches of the same size (`benchmarks/decode_throughput.py`'s pieces).
   Goal: decoding >= 1,000,000 images/s for the small decoder at 64 px.
3. `cifar10_encode`: `d3codec encode cifar10 --budget 1ipc --objective mtt+mmd` (the paper's
   objective) for a few minutes (`--cifar-iterations`, 2 experts), then `d3codec eval`. Skipped
   without `--cifar10 DIR` (a folder `encode cifar10 --data-dir` reads).
4. `federated_tiny`: `encode DATASET --subtasks 2` on Tiny-ImageNet-100 (`--tiny`, any DATASET
   spec `encode` reads), then a short eval, if the suite's time allows. Skipped without `--tiny`.

Results go to OUTPUT/gpu_suite.json and OUTPUT/gpu_suite.md (rewritten after every step, so a
killed suite still leaves what it measured), step logs to OUTPUT/logs/. `--smoke` runs every step
on the CPU at toy size (toy decoders, a generated 4-class npz dataset, a few iterations).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
from typing import Any, Callable, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = ("cuda_tests", "decode_throughput", "cifar10_encode", "federated_tiny")
#: Seconds each step may run (full size); the suite also stops starting steps past --budget-s.
CAPS = {"cuda_tests": 90, "decode_throughput": 150, "cifar10_encode": 300, "federated_tiny": 150}
SMOKE_CAPS = {"cuda_tests": 120, "decode_throughput": 90, "cifar10_encode": 150, "federated_tiny": 150}
#: Least time worth starting the optional federated step with.
FEDERATED_MIN_S = 90
GOAL_IMAGES_PER_S = 1_000_000
TOY_HPARAMS = {"small": {"width": 16, "latent_dim": 8}, "medium": {"width": 16, "latent_dim": 32},
               "large": {"width": 8, "latent_dim": 32}}


def _env() -> dict[str, str]:
    """The environment of child processes: this checkout's d3codec first on the path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _run(cmd: list[str], log: str, timeout: float) -> tuple[int, str]:
    """Run `cmd` (its own process group, killed whole at `timeout`), appending its output to `log`;
    returns (exit status, output). A timeout raises `TimeoutError`."""
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                                env=_env(), start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            f.write(out or "")
            raise TimeoutError(f"{cmd[2] if len(cmd) > 2 else cmd[0]} ran past {timeout:.0f} s") from None
        f.write(out)
    return proc.returncode, out


def _d3codec(args: list[str], log: str, deadline: float) -> str:
    """`python -m d3codec ARGS` until `deadline` (time.monotonic()); its output, or RuntimeError."""
    rc, out = _run([sys.executable, "-m", "d3codec", *args], log, deadline - time.monotonic())
    if rc != 0:
        tail = [line for line in out.strip().splitlines() if line.strip()][-1:] or ["(no output)"]
        raise RuntimeError(f"d3codec {args[0]} exited {rc}: {tail[0][:300]}")
    return out


def _last_json(out: str) -> dict[str, Any]:
    for line in reversed(out.strip().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise RuntimeError("no JSON line in the output")


# ---- the steps (each runs in a child process: `gpu_suite.py --step NAME`) ----

def step_cuda_tests(args: argparse.Namespace, log: str, deadline: float) -> dict[str, Any]:
    xml = os.path.join(args.workdir, "cuda_tests.xml")
    files = ["tests/decode/test_cuda.py", "tests/test_device_auto.py"]
    rc, _ = _run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", f"--junitxml={xml}", *files],
                 log, deadline - time.monotonic())
    import xml.etree.ElementTree as ET

    suite = ET.parse(xml).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    if rc != 0:
        raise RuntimeError(f"pytest exited {rc}: {counts['failures']} failed, {counts['errors']} errors")
    return {"files": files, **counts}


def step_decode_throughput(args: argparse.Namespace, log: str, deadline: float) -> dict[str, Any]:
    import torch

    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    from decode_throughput import _rates, consumer_step, make_file, naive_step, ours_step

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    # smoke: toy decoders at 16 and 32 px, tiny batches, one short round each
    batch, train_batch, seconds, rounds = (16, 2, 0.1, 1) if args.smoke else (4096, 512, 2.0, 2)
    precision = "bf16" if cuda else "fp32"
    sync: Callable[[], None] = torch.cuda.synchronize if cuda else (lambda: None)
    rows = []
    for family in ("small", "medium", "large"):
        for res in ((16, 32) if args.smoke else (32, 64)):
            d3 = make_file(family, res, hparams=TOY_HPARAMS[family] if args.smoke else None)
            rates = _rates({"ours": ours_step(d3, batch, device, precision=precision),
                            "naive": naive_step(d3, batch, device),
                            "convnet": consumer_step(res, min(batch, train_batch), device),
                            "resnet18": consumer_step(res, min(batch, train_batch), device, "resnet18")},
                           seconds, rounds, sync)
            row = {"family": family, "resolution": res, "batch_size": batch,
                   "train_batch_size": min(batch, train_batch), "precision": precision,
                   **{f"{k}_images_per_s": round(v, 1) for k, v in rates.items()},
                   "vs_naive": round(rates["ours"] / rates["naive"], 2),
                   "vs_convnet_step": round(rates["ours"] / rates["convnet"], 2),
                   "vs_resnet18_step": round(rates["ours"] / rates["resnet18"], 2)}
            rows.append(row)
            with open(log, "a") as f:
                f.write(json.dumps(row) + "\n")
    top = max(r["resolution"] for r in rows)  # 64 px (32 in smoke runs)
    small = next(r for r in rows if r["family"] == "small" and r["resolution"] == top)
    return {"device": str(device), "rows": rows, "toy_decoders": args.smoke,
            "goal": {"images_per_s": GOAL_IMAGES_PER_S, "family": "small", "resolution": top,
                     "measured": small["ours_images_per_s"], "met": small["ours_images_per_s"] >= GOAL_IMAGES_PER_S}}


def _toy_dataset(workdir: str, classes: int = 4, per_class: int = 40, size: int = 8) -> str:
    """A learnable npz dataset for smoke runs: a per-class colour plus noise (deterministic)."""
    import numpy as np

    path = os.path.join(workdir, "toy.npz")
    if not os.path.exists(path):
        rng = np.random.default_rng(0)
        base = rng.integers(30, 220, (classes, 1, 1, 3))
        x = np.clip(base.repeat(per_class, 0) + rng.integers(-30, 30, (classes * per_class, size, size, 3)), 0, 255)
        np.savez(path, x=x.astype(np.uint8), y=np.arange(classes).repeat(per_class))
    return path


def _encode_and_eval(args: argparse.Namespace, log: str, deadline: float, dataset: list[str], name: str,
                     encode_extra: list[str], eval_extra: list[str], budget: str = "1ipc") -> dict[str, Any]:
    out = os.path.join(args.workdir, f"{name}.d3")
    cache = ["--cache-dir", os.path.join(args.workdir, "cache")]
    for stale in (out, out + ".ckpt"):
        if os.path.exists(stale):
            os.remove(stale)
    t0 = time.monotonic()
    _d3codec(["encode", *dataset, "--budget", budget, "-o", out, "--device", args.device, "-q", *cache,
              *encode_extra], log, deadline)
    encode_s = time.monotonic() - t0
    info = _last_json(_d3codec(["info", out, "--json"], log, deadline))
    t0 = time.monotonic()
    test = ["--test", dataset[0], *dataset[1:]]
    report = _last_json(_d3codec(["eval", out, *test, "--device", args.device, "--json", "-q", *cache, *eval_extra],
                                 log, deadline))
    return {"file": out, "budget": budget, "bytes": os.path.getsize(out), "encode_s": round(encode_s, 1),
            "eval_s": round(time.monotonic() - t0, 1), "encode_args": encode_extra, "eval_args": eval_extra,
            "file_info": {k: info.get(k) for k in ("priors", "labels", "provenance") if k in info},
            "accuracy": report["accuracy"], "eval_device": report["device"], "recipe": report["recipe"]}


def step_cifar10_encode(args: argparse.Namespace, log: str, deadline: float) -> dict[str, Any]:
    if args.smoke:
        dataset = [_toy_dataset(args.workdir)]
        extra = ["--iterations", "1", "--fit-steps", "2", "--experts", "1", "--expert-epochs", "3"]
        evals = ["--steps", "2", "--runs", "1", "--batch", "32"]
    else:
        dataset = ["cifar10", "--data-dir", args.cifar10]
        extra = ["--iterations", str(args.cifar_iterations), "--experts", "2", "--expert-epochs", "6"]
        evals = ["--steps", str(args.eval_steps), "--runs", "2"]
    return _encode_and_eval(args, log, deadline, dataset, "cifar10-1ipc", ["--objective", "mtt+mmd", *extra], evals)


def step_federated_tiny(args: argparse.Namespace, log: str, deadline: float) -> dict[str, Any]:
    if args.smoke:
        dataset = [_toy_dataset(args.workdir)]
        extra = ["--iterations", "2", "--fit-steps", "2", "--experts", "1", "--expert-epochs", "2"]
        evals = ["--steps", "2", "--runs", "1", "--batch", "32"]
    else:
        dataset = [args.tiny]
        extra = ["--iterations", str(args.tiny_iterations), "--experts", "1", "--expert-epochs", "3"]
        evals = ["--steps", str(args.eval_steps), "--runs", "1"]
    # toy images are too small for two decoders in 1ipc: the smoke run gives 4ipc
    return _encode_and_eval(args, log, deadline, dataset, "tiny-federated", ["--subtasks", "2", *extra], evals,
                            budget="4ipc" if args.smoke else "1ipc")


STEP_FUNCS = {"cuda_tests": step_cuda_tests, "decode_throughput": step_decode_throughput,
              "cifar10_encode": step_cifar10_encode, "federated_tiny": step_federated_tiny}


# ---- the suite ----

def _skip_reason(name: str, args: argparse.Namespace, left: float) -> Optional[str]:
    if args.smoke:
        return None
    if name == "cifar10_encode" and not (args.cifar10 and os.path.isdir(args.cifar10)):
        return f"no CIFAR-10 data: pass --cifar10 DIR (got {args.cifar10!r})"
    if name == "federated_tiny":
        if not (args.tiny and os.path.exists(args.tiny)):
            return f"no Tiny-ImageNet-100 data: pass --tiny DATASET (got {args.tiny!r})"
        if left < FEDERATED_MIN_S:
            return f"time: {left:.0f} s left of the suite's budget, the step needs {FEDERATED_MIN_S} s"
    return None


def environment(device: str) -> dict[str, Any]:
    import torch

    env: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__, "device": device,
                           "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count()}
    if device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(0)
        env["cuda"] = torch.version.cuda
    try:
        env["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                       text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        env["commit"] = None
    return env


def run_suite(args: argparse.Namespace) -> dict[str, Any]:
    os.makedirs(os.path.join(args.output, "logs"), exist_ok=True)
    os.makedirs(os.path.join(args.output, "work"), exist_ok=True)
    start = time.monotonic()
    caps = SMOKE_CAPS if args.smoke else CAPS
    results: dict[str, Any] = {"suite": "gpu_suite", "smoke": args.smoke, "environment": environment(args.device),
                               "budget_s": args.budget_s, "goal": f"decoding >= {GOAL_IMAGES_PER_S:,} images/s for "
                               "the small decoder at 64 px", "steps": []}
    only = args.only.split(",") if args.only else list(STEPS)
    for name in STEPS:
        left = args.budget_s - (time.monotonic() - start)
        entry: dict[str, Any] = {"name": name, "cap_s": caps[name]}
        reason = "not selected (--only)" if name not in only else _skip_reason(name, args, left)
        if reason is None and left < 5:
            reason = f"time: the suite's budget of {args.budget_s:.0f} s is spent"
        if reason is not None:
            entry.update(status="skipped", reason=reason, seconds=0.0)
        else:
            entry.update(_run_step(name, args, min(caps[name], left)))
        results["steps"].append(entry)
        results["total_s"] = round(time.monotonic() - start, 1)
        _write(results, args.output)
        print(f"{name}: {entry['status']} ({entry['seconds']:.0f} s)" + (f": {entry['reason']}" if entry.get("reason")
                                                                           else ""), flush=True)
    return results


def _run_step(name: str, args: argparse.Namespace, cap: float) -> dict[str, Any]:
    """Run step `name` in a child process capped at `cap` seconds; its status, time and result."""
    log = os.path.join(args.output, "logs", f"{name}.log")
    result_path = os.path.join(args.output, "work", f"{name}.json")
    if os.path.exists(result_path):
        os.remove(result_path)
    cmd = [sys.executable, os.path.abspath(__file__), "--step", name, "-o", args.output, "--device", args.device,
           "--cap-s", str(cap), "--cifar-iterations", str(args.cifar_iterations),
           "--tiny-iterations", str(args.tiny_iterations), "--eval-steps", str(args.eval_steps)]
    cmd += (["--smoke"] if args.smoke else []) + (["--cifar10", args.cifar10] if args.cifar10 else []) + \
        (["--tiny", args.tiny] if args.tiny else [])
    t0 = time.monotonic()
    try:
        rc, out = _run(cmd, log, cap + 15)  # the child stops its own commands at the cap
    except TimeoutError as exc:
        return {"status": "timeout", "reason": str(exc), "seconds": round(time.monotonic() - t0, 1)}
    seconds = round(time.monotonic() - t0, 1)
    if rc == 0 and os.path.exists(result_path):
        with open(result_path) as f:
            return {"status": "ok", "seconds": seconds, "result": json.load(f)}
    lines = [line for line in out.strip().splitlines() if line.strip()]
    reason = lines[-1][:400] if lines else f"exited {rc} with no output"
    status = "timeout" if "ran past" in reason else "failed"
    return {"status": status, "reason": reason, "seconds": seconds, "log": os.path.relpath(log, args.output)}


def run_child(args: argparse.Namespace) -> int:
    """`--step NAME`: run one step, write its result JSON; failures end in one `error:` line."""
    args.workdir = os.path.join(args.output, "work")
    log = os.path.join(args.output, "logs", f"{args.step}.log")
    deadline = time.monotonic() + args.cap_s
    try:
        result = STEP_FUNCS[args.step](args, log, deadline)
    except Exception as exc:  # noqa: BLE001 - any failure is recorded by the suite, which goes on
        print(f"error: {type(exc).__name__}: {exc}", flush=True)
        return 1
    with open(os.path.join(args.workdir, f"{args.step}.json"), "w") as f:
        json.dump(result, f, sort_keys=True)
    return 0


# ---- reports ----

def _write(results: dict[str, Any], output: str) -> None:
    for name, text in (("gpu_suite.json", json.dumps(results, indent=1, sort_keys=True)),
                       ("gpu_suite.md", render_markdown(results))):
        tmp = os.path.join(output, f".{name}.tmp")
        with open(tmp, "w") as f:
            f.write(text + "\n")
        os.replace(tmp, os.path.join(output, name))


def _fmt(x: Optional[float]) -> str:
    return "n/a" if x is None else f"{x:,.0f}"


def render_markdown(results: dict[str, Any]) -> str:
    env = results["environment"]
    what = env.get("gpu") or f"CPU ({env.get('cpu')}, {env.get('cpu_count')} cores)"
    lines = [f"# GPU suite{' (smoke: toy sizes on the CPU)' if results['smoke'] else ''}", "",
             f"Device {env['device']}: {what}; torch {env['torch']}, Python {env['python']}, commit {env.get('commit')}.",
             f"Goal: {results['goal']}.", "",
             "| step | status | seconds (cap) | summary |", "|---|---|---|---|"]
    for s in results["steps"]:
        lines.append(f"| {s['name']} | {s['status']} | {s['seconds']:.0f} ({s['cap_s']}) | {_summary(s)} |")
    lines.append(f"\nTotal {results.get('total_s', 0):.0f} s of a {results['budget_s']:.0f} s budget.")
    thr = next((s for s in results["steps"] if s["name"] == "decode_throughput" and s["status"] == "ok"), None)
    if thr:
        r = thr["result"]
        goal = r["goal"]
        lines += ["", f"## Decode throughput on {r['device']}" + (" (toy decoders)" if r["toy_decoders"] else ""), "",
                  f"Goal {goal['images_per_s']:,} images/s, small decoder at 64 px: measured "
                  f"{goal['measured']:,.0f} at {goal['resolution']} px ({'met' if goal['met'] else 'not met'}).", "",
                  "| decoder | px | D3Dataset img/s | naive img/s | x naive | ConvNet step img/s | x ConvNet | "
                  "ResNet-18 step img/s | x ResNet-18 |", "|---|---|---|---|---|---|---|---|---|"]
        for row in r["rows"]:
            lines.append(f"| {row['family']} | {row['resolution']} | {_fmt(row['ours_images_per_s'])} | "
                         f"{_fmt(row['naive_images_per_s'])} | {row['vs_naive']} | {_fmt(row['convnet_images_per_s'])} | "
                         f"{row['vs_convnet_step']} | {_fmt(row['resnet18_images_per_s'])} | {row['vs_resnet18_step']} |")
    return "\n".join(lines)


def _summary(step: dict[str, Any]) -> str:
    if step["status"] != "ok":
        return str(step.get("reason", "")).replace("|", "/")
    r = step["result"]
    if step["name"] == "cuda_tests":
        return f"{r['passed']} passed, {r['skipped']} skipped of {r['tests']}"
    if step["name"] == "decode_throughput":
        g = r["goal"]
        return f"small {g['resolution']} px: {g['measured']:,.0f} img/s ({'goal met' if g['met'] else 'goal not met'})"
    acc = r["accuracy"]
    return (f"{100 * acc['mean']:.2f}% +- {100 * acc['std']:.2f} ({len(acc['runs'])} run(s)); {r['bytes']:,} B; "
            f"encode {r['encode_s']:.0f} s, eval {r['eval_s']:.0f} s")


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-o", "--output", required=True, help="folder for gpu_suite.json, gpu_suite.md and logs")
    ap.add_argument("--smoke", action="store_true", help="every step at toy size on the CPU")
    ap.add_argument("--device", default=None, help="default: cuda (cpu with --smoke)")
    ap.add_argument("--cifar10", help="CIFAR-10 folder (`encode cifar10 --data-dir`); the step is skipped without it")
    ap.add_argument("--tiny", help="Tiny-ImageNet-100 DATASET spec for `encode`; the step is skipped without it")
    ap.add_argument("--cifar-iterations", type=int, default=300, help="distillation iterations of the CIFAR-10 encode")
    ap.add_argument("--tiny-iterations", type=int, default=100, help="iterations of the federated encode")
    ap.add_argument("--eval-steps", type=int, default=1000, help="SGD steps per evaluation run")
    ap.add_argument("--budget-s", type=float, default=570.0, help="no step starts past this many seconds")
    ap.add_argument("--only", help="comma-separated steps to run (the others are recorded as skipped)")
    ap.add_argument("--step", choices=STEPS, help=argparse.SUPPRESS)
    ap.add_argument("--cap-s", type=float, default=600.0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.device = args.device or ("cpu" if args.smoke else "cuda")
    if args.step:
        return run_child(args)
    if not args.smoke and args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            print("error: no CUDA device; run with --smoke (CPU, toy sizes) or --device cpu", file=sys.stderr)
            return 1
    results = run_suite(args)
    bad = [s["name"] for s in results["steps"] if s["status"] in ("failed", "timeout")]
    print(f"wrote {os.path.join(args.output, 'gpu_suite.md')} and gpu_suite.json"
          + (f"; failed: {', '.join(bad)}" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
