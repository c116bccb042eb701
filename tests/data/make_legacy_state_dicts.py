"""Writes tests/data/legacy_state_dicts.pt with the version BEFORE the house
redesign (commit 2fbb234), for tests/test_legacy_state_dicts.py:

    git worktree add /tmp/v0 2fbb234
    PYTHONPATH=/tmp/v0/src:tests python tests/data/make_legacy_state_dicts.py

For every method registered then: 3 steps of its default configuration on a
small float64 MLP over SGD with momentum, then the model's and the
optimizer's state dicts, then 3 more steps and the weights they give.
"""

from __future__ import annotations

import copy

import torch

import flatminima
import helpers

CONFIGS = {  # the default configurations of tests/methods_db.py at 2fbb234
    "sam": {"rho": 0.05}, "asam": {"rho": 0.5, "eta": 0.01}, "gcsam": {"rho": 0.05},
    "wsam": {"rho": 0.05, "gamma": 0.9}, "gsam": {"rho": 0.05, "alpha": 0.4}, "fisher_sam": {"rho": 0.1, "eta": 1.0},
    "friendly_sam": {"rho": 0.05, "sigma": 1.0, "lam": 0.9}, "vasso": {"rho": 0.05, "theta": 0.9},
    "looksam": {"rho": 0.05, "k": 2, "alpha": 0.7}, "esam": {"rho": 0.05, "beta": 0.5, "gamma": 1.0, "seed": 74},
    "sam_every_k": {"rho": 0.05, "k": 3}, "ae_sam": {"rho": 0.05, "sam_fraction": 0.5},
}


def main() -> None:
    out = {}
    data = helpers.batches(6, torch.float64)
    for name, kwargs in CONFIGS.items():
        model = helpers.mlp(torch.float64, seed=0)
        opt = flatminima.create(name, helpers.two_groups(model), torch.optim.SGD, lr=0.1, momentum=0.9, **kwargs)
        for x, y in data[:3]:
            opt.step(helpers.make_closure(opt, model, x, y))
        # deep copies: the state dicts hold references to tensors the next steps change in place
        saved = copy.deepcopy({"model": model.state_dict(), "optimizer": opt.state_dict()})
        for x, y in data[3:]:
            opt.step(helpers.make_closure(opt, model, x, y))
        out[name] = {**saved, "kwargs": kwargs, "after": [p.detach().clone() for p in model.parameters()]}
    torch.save(out, "tests/data/legacy_state_dicts.pt")


if __name__ == "__main__":
    main()
