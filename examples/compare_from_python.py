"""The `flatminima compare` command from Python: the same numbers, no CLI.

    python examples/compare_from_python.py            # a quick 2-method, 2-seed comparison (~20 s on 2 CPU cores)

``ExperimentConfig`` holds every setting of the command (its field names are
the flag names); ``compare`` trains every method x seed and returns the runs
and their summary; ``train_run`` trains one. A comparison written by the
command is replayed with ``ExperimentConfig(**json.load(open("runs/x/config.json"))["config"])``.
"""

from __future__ import annotations

from flatminima.experiments import ExperimentConfig, compare, train_run
from flatminima.experiments.report import print_table


def main() -> None:
    # = flatminima compare --methods sgd sam:rho=0.3 --seeds 2 --epochs 15 --noise 0.3 (30% noisy labels, asked for)
    cfg = ExperimentConfig(methods=["sgd", "sam:rho=0.3"], seeds=[0, 1], epochs=15, noise=0.3)
    result = compare(cfg)  # out=None: nothing written
    print_table(result.summary(), caption="mean ± std over 2 seeds; accuracies in %")

    # One run, and its per-epoch history.
    run = train_run(cfg, "sam:rho=0.3", seed=0)
    for row in run.history[::5]:
        print(f"epoch {row['epoch']:>2}: test acc {row['test_acc']:.1f}%, memorised {row['memorised']:.1f}%")
    same = run.final["test_acc"] == next(r for r in result.runs if r.label == "sam:rho=0.3" and r.seed == 0).final["test_acc"]
    print(f"same number as inside compare(): {same}")


if __name__ == "__main__":
    main()
