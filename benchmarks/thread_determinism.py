"""Do encodes at different intra-op thread counts give the same bytes, and what do threads buy?

Runs `d3codec encode DATASET --budget B --threads N` once per thread count and repeat, each in a
fresh process with a fresh cache (experts trained anew, as their thread count also shapes the
file), and prints each run's wall seconds and file hash, then whether the files match. With
`--steps`, also times the encode's stages (an expert SGD step, a fit step, an MMD step) at each
thread count, interleaved in one process; the minimum over rounds is the least-contended figure.

    python benchmarks/thread_determinism.py --threads 1,2 --repeat 1
    python benchmarks/thread_determinism.py --threads 1,2 --iterations 30 --fit-steps 100 --steps
"""
from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable


def encode_runs(dataset: str, budget: str, threads: list[int], repeat: int, extra: list[str]) -> dict[str, list[str]]:
    """Thread count -> the sha256 of each repeat's file; prints one line per run."""
    hashes: dict[str, list[str]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(repeat):
            for t in threads:
                out, cache = os.path.join(tmp, f"t{t}-r{r}.d3"), os.path.join(tmp, f"cache-t{t}-r{r}")
                start = time.perf_counter()
                subprocess.run([sys.executable, "-m", "d3codec", "encode", dataset, "--budget", budget, "-o", out,
                                "--threads", str(t), "--cache-dir", cache, "-q", *extra], check=True)
                seconds = time.perf_counter() - start
                with open(out, "rb") as f:
                    digest = hashlib.sha256(f.read()).hexdigest()
                hashes.setdefault(str(t), []).append(digest)
                print(f"threads {t} repeat {r}: {seconds:8.1f} s  sha256 {digest[:16]}  "
                      f"(load average {os.getloadavg()[0]:.1f})", flush=True)
    return hashes


def step_times(dataset: str, budget: str, threads: list[int], rounds: int, steps: int) -> None:
    """Seconds per step of each encode stage at each thread count (min and median over rounds)."""
    import torch

    from d3codec.data import open_dataset
    from d3codec.distill.api import EncodeOptions, plan_for
    from d3codec.distill.distiller import Distiller
    from d3codec.distill.experts import ensure_experts

    with tempfile.TemporaryDirectory() as cache:
        ds = open_dataset(dataset, split="train", cache_dir=cache, progress=False)
        options = EncodeOptions(cache_dir=cache, quiet=True, num_experts=1, expert_epochs=1)
        plan, cfg, real, _ = plan_for(ds, budget, options)
        experts = ensure_experts(ds, num_experts=1, epochs=1, seed=cfg.seed, cache_dir=cache, progress=False)
        distiller = Distiller(plan, real.metadata(), real, experts, cfg)
        net = experts.build_model()
        opt = torch.optim.SGD(net.parameters(), lr=0.01)
        g = torch.Generator().manual_seed(0)

        def expert_step() -> None:
            idx = torch.randint(0, len(real), (256,), generator=g).numpy()
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(real.batch(idx)), real.label_tensor(idx)).backward()
            opt.step()

        def objective_step() -> None:
            distiller.iteration = max(distiller.iteration, cfg.fit_iterations)  # past the fit
            distiller.step()

        stages: list[tuple[str, Callable[[], None]]] = [("expert SGD step", expert_step), ("fit step", distiller.step),
                                                         ("objective step", objective_step)]
        for name, fn in stages:
            times: dict[int, list[float]] = {t: [] for t in threads}
            for r in range(rounds):
                for t in (threads if r % 2 == 0 else threads[::-1]):
                    torch.set_num_threads(t)
                    start = time.perf_counter()
                    for _ in range(steps):
                        fn()
                    times[t].append((time.perf_counter() - start) / steps)
            print(f"{name}: " + ", ".join(f"{t} thread(s) min {1000 * min(v):.1f} ms median "
                                         f"{1000 * statistics.median(v):.1f} ms" for t, v in times.items()), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--budget", default="1ipc")
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--iterations", type=int, help="passed to encode (default: its own)")
    parser.add_argument("--fit-steps", type=int, help="passed to encode (default: its own)")
    parser.add_argument("--steps", action="store_true", help="also time each stage per step")
    parser.add_argument("--rounds", type=int, default=6, help="with --steps: interleaved rounds")
    args = parser.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    extra = [] if args.iterations is None else ["--iterations", str(args.iterations)]
    extra += [] if args.fit_steps is None else ["--fit-steps", str(args.fit_steps)]
    hashes = encode_runs(args.dataset, args.budget, threads, args.repeat, extra)
    same_count = all(len(set(v)) == 1 for v in hashes.values())
    across = len({v[0] for v in hashes.values()}) == 1
    repeats = ("yes" if same_count else "NO") if args.repeat > 1 else "n/a (--repeat 1)"
    print(f"same thread count, same bytes: {repeats}; "
          f"across thread counts: {'identical' if across else 'different'}")
    if args.steps:
        step_times(args.dataset, args.budget, threads, args.rounds, 3)
    return 0


if __name__ == "__main__":
    sys.exit(main())
