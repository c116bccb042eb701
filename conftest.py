"""Collection rules for the doctests of src/flatminima (``--doctest-modules``,
see ``[tool.pytest.ini_options]`` in pyproject.toml).

Doctest collection imports every module of the package, so a module that
does something when imported is left out, and so is one whose optional
dependency is missing (the dev extra installs them all).
"""

import importlib.util

collect_ignore = [
    "src/flatminima/experiments/__main__.py",  # runs the command line on import
]

if importlib.util.find_spec("lightning") is None:
    collect_ignore.append("src/flatminima/lightning.py")
if importlib.util.find_spec("numpy") is None:  # the experiments import numpy (the cli extra)
    collect_ignore.append("src/flatminima/experiments")


import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _doctest_names(doctest_namespace: dict) -> None:
    """What the docstring examples share, fresh for each of them (so that an
    example shows its own call, not the same set-up again):

    * ``model``, ``x``, ``y``: a ``torch.nn.Linear(4, 2)`` and a batch of 8, and
      ``closure(opt)``: PyTorch's closure for ``opt`` (zero the gradients,
      forward, mean squared error, backward, return the loss), as written out
      in :class:`flatminima.SAM`'s example;
    * ``least_squares()``: ``(model, data, mse)`` of ``L(w) = mean_i (w . x_i - y_i)^2``
      on two weights starting at 0, whose Hessian is ``diag(1, 4)``, as written
      out in :func:`flatminima.sharpness.hvp`'s example.
    """
    import torch

    import flatminima

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    x, y = torch.randn(8, 4), torch.randn(8, 2)

    def closure(opt):
        def run():
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            return loss

        return run

    def least_squares():
        net = torch.nn.Linear(2, 1, bias=False)
        torch.nn.init.zeros_(net.weight)
        data = [(torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.ones(2, 1))]
        return net, data, torch.nn.functional.mse_loss

    doctest_namespace.update(torch=torch, flatminima=flatminima, model=model, x=x, y=y, closure=closure,
                             least_squares=least_squares)
