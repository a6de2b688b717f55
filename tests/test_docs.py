"""The method guide's worked example (docs/adding-a-method.md) runs: a regularizer in a dozen lines."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

from cl_lightning.train import train

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "adding-a-method.md"


@pytest.fixture
def guide_module(monkeypatch: pytest.MonkeyPatch):
    code = re.search(r"```python\n(.*?)```", GUIDE.read_text(), re.S).group(1)
    namespace: dict = {}
    exec(code, namespace)  # noqa: S102 - the guide's own example
    module = type(sys)("guide_example")
    module.L2Anchor = namespace["L2Anchor"]
    monkeypatch.setitem(sys.modules, "guide_example", module)
    return module


def test_guide_example_pulls_towards_the_last_anchor(make_cfg, guide_module) -> None:
    loose = train(make_cfg("method._target_=guide_example.L2Anchor", "+method.lambda_=0.0", "logger=none"))
    pulled = train(make_cfg("method._target_=guide_example.L2Anchor", "+method.lambda_=2.0", "logger=none"))
    assert pulled["method"] == "l2" and pulled["diagnostics"]["l2"]["lambda_"] == 2.0
    (method,) = pulled.methods
    # the penalty is zero at the anchor (the weights at the end of the last task) and positive away from it
    assert float(method.penalty()) == pytest.approx(0.0, abs=1e-10)
    with torch.no_grad():
        next(pulled.module.net.parameters()).add_(0.1)
    assert float(method.penalty()) > 0
    # a pull holds the new tasks back
    assert (
        torch.tensor(pulled["acc_matrix"]).diagonal()[1:].mean()
        < torch.tensor(loose["acc_matrix"]).diagonal()[1:].mean()
    )


def test_guide_yaml_default_is_auto(make_cfg, guide_module) -> None:
    run = train(make_cfg("method._target_=guide_example.L2Anchor", "logger=none", "max_tasks=2"))
    assert 0 < run["diagnostics"]["l2"]["lambda_"] <= 1.0
