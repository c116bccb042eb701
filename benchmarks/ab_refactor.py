"""Interleaved A/B timing of the optimizer step: OLD vs NEW flatminima.

    git worktree add /tmp/v0 2fbb234        # OLD: any earlier commit
    python benchmarks/ab_refactor.py [--rounds 8] [--warmup 20] [--steps 200]
        [--old /tmp/v0/src] [--new src] [--raw /tmp/ab_refactor_raw.json]

Used to check that the house redesign (issue #11) did not slow the step
down; the figures are in BENCHMARKS.md.

Each (version, config) pair runs in its own process (``--worker VERSION_PATH
CONFIG``), with ``PYTHONPATH=VERSION_PATH`` and one torch thread. A round
runs, for every config, one OLD and one NEW process; the order alternates
per round (OLD first on even rounds, NEW first on odd ones). Each process
times ``warmup`` untimed then ``steps`` timed steps with
``time.perf_counter`` and reports the per-step wall times.

The table gives the median over all timed steps of all rounds (ms), the ratio
NEW/OLD of those medians, and the min-max (and median) of the per-round
ratios (median NEW / median OLD within one round).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

CONFIGS = [
    "sgd_mlp",  # plain torch.optim.SGD: the floor / noise reference
    "sam_mlp",
    "sam_cnn",
    "wsam_mlp",
    "gsam_mlp",
    "looksam_mlp",
    "ae_sam_mlp",
    "sam_mlp_bookkeeping",  # first_step() + second_step() only, gradients preset
]

BATCH = 64
LR = 0.05
MOMENTUM = 0.9


# ---------------------------------------------------------------------- worker
def _mlp(torch):
    nn = torch.nn
    return nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))


def _cnn(torch):
    nn = torch.nn

    def block(cin, cout):
        return [
            nn.Conv2d(cin, cout, 3, padding=1),
            nn.BatchNorm2d(cout),
            nn.ReLU(),
            nn.Conv2d(cout, cout, 3, padding=1),
            nn.BatchNorm2d(cout),
            nn.ReLU(),
            nn.MaxPool2d(2),
        ]

    # 28 -> 14 -> 7 -> 3; 6 convs + 6 BNs + 1 linear = 26 parameter tensors
    return nn.Sequential(*block(1, 16), *block(16, 32), *block(32, 64), nn.Flatten(), nn.Linear(64 * 3 * 3, 10))


def worker(version_path: str, config: str, warmup: int, steps: int) -> None:
    import torch

    torch.set_num_threads(1)
    import flatminima

    src = os.path.realpath(flatminima.__file__)
    if not src.startswith(os.path.realpath(version_path) + os.sep):
        raise SystemExit(f"wrong flatminima imported: {src} (wanted under {version_path})")

    torch.manual_seed(0)
    method, arch = config.split("_mlp")[0], "mlp"
    if config == "sam_cnn":
        method, arch = "sam", "cnn"
    if arch == "mlp":
        model = _mlp(torch)
        x = torch.randn(BATCH, 784)
    else:
        model = _cnn(torch)
        x = torch.randn(BATCH, 1, 28, 28)
    y = torch.randint(0, 10, (BATCH,))
    model.train()
    loss_fn = torch.nn.functional.cross_entropy

    if method == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    else:
        kwargs = {"lr": LR, "momentum": MOMENTUM}
        if method == "looksam":
            kwargs["k"] = 5
        if arch == "cnn":
            kwargs["model"] = model
        opt = flatminima.create(method, model.parameters(), torch.optim.SGD, **kwargs)

    def closure():
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss

    times: list[float] = []
    pc = time.perf_counter
    if config == "sam_mlp_bookkeeping":
        params = [p for p in model.parameters()]
        model.zero_grad()
        loss_fn(model(x), y).backward()
        saved = [p.grad.detach().clone() for p in params]

        def preset():
            with torch.no_grad():
                for p, g in zip(params, saved):
                    if p.grad is None:
                        p.grad = g.clone()
                    else:
                        p.grad.copy_(g)

        for i in range(warmup + steps):
            preset()
            t0 = pc()
            opt.first_step()
            t1 = pc()
            preset()
            t2 = pc()
            opt.second_step()
            t3 = pc()
            if i >= warmup:
                times.append((t1 - t0) + (t3 - t2))
    else:
        for i in range(warmup + steps):
            t0 = pc()
            opt.step(closure)
            t1 = pc()
            if i >= warmup:
                times.append(t1 - t0)
    # sanity: the model did not blow up
    with torch.no_grad():
        final = float(loss_fn(model(x), y))
    print(json.dumps({"file": src, "config": config, "times": times, "final_loss": final}))


# ---------------------------------------------------------------------- driver
def run_one(version_path: str, config: str, warmup: int, steps: int) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = version_path
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = "1"
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", version_path, config,
           "--warmup", str(warmup), "--steps", str(steps)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"worker failed ({version_path}, {config}):\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", nargs=2, metavar=("VERSION_PATH", "CONFIG"))
    ap.add_argument("--old", default="/tmp/v0/src")
    ap.add_argument("--new", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--raw", default="/tmp/ab_refactor_raw.json", help="where to write the per-step times")
    args = ap.parse_args()

    if args.worker:
        worker(args.worker[0], args.worker[1], args.warmup, args.steps)
        return

    configs = [c for c in args.configs.split(",") if c]
    versions = {"OLD": args.old, "NEW": args.new}
    # results[config][label] = list over rounds of per-step time lists
    results: dict[str, dict[str, list[list[float]]]] = {c: {"OLD": [], "NEW": []} for c in configs}
    losses: dict[str, dict[str, list[float]]] = {c: {"OLD": [], "NEW": []} for c in configs}
    t_start = time.time()
    for r in range(args.rounds):
        order = ["OLD", "NEW"] if r % 2 == 0 else ["NEW", "OLD"]
        for c in configs:
            for label in order:
                res = run_one(versions[label], c, args.warmup, args.steps)
                results[c][label].append(res["times"])
                losses[c][label].append(res["final_loss"])
        print(f"# round {r + 1}/{args.rounds} done ({time.time() - t_start:.0f} s)", file=sys.stderr, flush=True)

    with open(args.raw, "w") as f:
        json.dump({"versions": versions, "results": results, "final_loss": losses}, f)

    print(f"OLD = {args.old}, NEW = {args.new}; {args.rounds} rounds, {args.warmup} warm-up + "
          f"{args.steps} timed steps per process, torch threads = 1, batch {BATCH}\n")
    print("| config | OLD median ms | NEW median ms | NEW/OLD (pooled medians) | per-round NEW/OLD median | per-round min-max |")
    print("|---|---:|---:|---:|---:|---:|")
    for c in configs:
        old_all = [t for ts in results[c]["OLD"] for t in ts]
        new_all = [t for ts in results[c]["NEW"] for t in ts]
        mo, mn = statistics.median(old_all), statistics.median(new_all)
        per_round = [statistics.median(n) / statistics.median(o) for o, n in zip(results[c]["OLD"], results[c]["NEW"])]
        print(f"| {c} | {mo * 1e3:.4f} | {mn * 1e3:.4f} | {mn / mo:.3f} | {statistics.median(per_round):.3f} | "
              f"{min(per_round):.3f}-{max(per_round):.3f} |")
    print(f"\nraw per-step times: {args.raw}")


if __name__ == "__main__":
    main()
