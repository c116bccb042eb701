"""SharpnessAwareTrainer's step against a plain ``transformers.Trainer`` step with the
same base optimizer, in one process (``python -m benchmarks.hf``; part of ``make bench``).

Rounds alternate between the two trainers (order shuffled per round); a
callback times each optimizer step (``on_step_begin`` to ``on_step_end``:
forward, backward, the step); the first steps of each round are warm-up.
The figure is median(SAM step) / median(plain step), and a SAM step runs two
forward-backward passes, so about 2 is the floor.
"""

from __future__ import annotations

import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch


def _model(tiny: bool) -> torch.nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    size = dict(hidden_size=16, num_hidden_layers=1, intermediate_size=32) if tiny else \
        dict(hidden_size=128, num_hidden_layers=2, intermediate_size=256)
    return BertForSequenceClassification(BertConfig(vocab_size=512, num_attention_heads=2, max_position_embeddings=64,
                                                    num_labels=2, **size))


def _data(n: int, seq: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 512, (n, seq), generator=g)
    return [{"input_ids": ids[i], "labels": (ids[i, 0] < 256).long()} for i in range(n)]


def _trainer(kind: str, optim: str, steps: int, out: str, tiny: bool, times: list[float]) -> Any:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from flatminima.hf import SharpnessAwareTrainer

    class Clock(TrainerCallback):  # type: ignore[misc]
        def on_step_begin(self, *args: Any, **kwargs: Any) -> None:
            self.t = time.perf_counter()

        def on_step_end(self, *args: Any, **kwargs: Any) -> None:
            times.append(time.perf_counter() - self.t)

    args = TrainingArguments(out, per_device_train_batch_size=16, max_steps=steps, learning_rate=1e-4, optim=optim,
                             use_cpu=True, report_to="none", save_strategy="no", disable_tqdm=True, logging_steps=10**6)
    data = _data(16 * steps, 8 if tiny else 32)
    common = dict(model=_model(tiny), args=args, train_dataset=data, callbacks=[Clock()])
    return SharpnessAwareTrainer(**common, method="sam") if kind == "sam" else Trainer(**common)


def bench_hf(*, quick: bool = False, tiny: bool = False, progress: Callable[[str], None] = lambda m: None) -> dict[str, Any]:
    from transformers import logging

    logging.set_verbosity_error()
    rounds, steps, warm = (2, 4, 1) if quick else (30, 8, 3)  # short rounds: a burst of load hits both alike
    out: dict[str, Any] = {"rounds": rounds, "steps": steps, "warmup": warm, "tiny": tiny}
    rng = random.Random(0)
    for optim in ("sgd", "adamw_torch"):
        samples: dict[str, list[float]] = {"plain": [], "sam": []}
        for r in range(rounds + 1):  # round 0 warms both up and is dropped
            progress(f"hf trainer {optim}: round {r}/{rounds}")
            for kind in rng.sample(list(samples), 2):
                times: list[float] = []
                with tempfile.TemporaryDirectory() as tmp:
                    _trainer(kind, optim, steps, tmp, tiny, times).train()
                if r:
                    samples[kind] += times[warm:]
        plain, sam = statistics.median(samples["plain"]), statistics.median(samples["sam"])
        out[optim] = {"plain_ms": plain * 1e3, "sam_ms": sam * 1e3, "sam_vs_plain": sam / plain,
                      "n": len(samples["sam"])}
    return out


def render(res: dict[str, Any]) -> str:
    lines = [f"Hugging Face Trainer: SharpnessAwareTrainer(method='sam') step / plain Trainer step, same base optimizer "
             f"(BERT {'tiny' if res['tiny'] else '2x128'}, batch 16; medians of {res['rounds']} interleaved rounds x "
             f"{res['steps'] - res['warmup']} steps; target <= 2.1)"]
    lines.append(f"{'optim':<12} {'plain [ms]':>11} {'SAM [ms]':>10} {'SAM x plain':>12}")
    for optim in ("sgd", "adamw_torch"):
        w = res[optim]
        lines.append(f"{optim:<12} {w['plain_ms']:>11.2f} {w['sam_ms']:>10.2f} {w['sam_vs_plain']:>12.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m benchmarks.hf", description=__doc__)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    print(render(bench_hf(quick=a.quick, tiny=a.tiny, progress=lambda m: print(f"[bench] {m}", file=sys.stderr))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
