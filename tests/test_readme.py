"""The README's "Adding a method" example works as written."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from cl_lightning.methods.base import CLMethod
from cl_lightning.train import train

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_method_example_trains_and_holds_weights(make_cfg, monkeypatch) -> None:
    text = README.read_text()
    section = text[text.index("### Adding a method") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {"CLMethod": CLMethod}
    exec(code, namespace)  # noqa: S102 - the README's own example
    module = type("readme_example", (), {})
    monkeypatch.setitem(__import__("sys").modules, "readme_example", module)
    module.L2Anchor = namespace["L2Anchor"]
    loose = train(make_cfg("method._target_=readme_example.L2Anchor", "+method.strength=0.0", "logger=none"))
    stiff = train(make_cfg("method._target_=readme_example.L2Anchor", "+method.strength=1000.0", "logger=none"))
    assert loose["method"] == "l2"
    # a strong pull to the first task's weights keeps it remembered (and keeps later tasks from being learned)
    assert stiff["acc_matrix"][-1][0] > loose["acc_matrix"][-1][0]
    assert torch.tensor(stiff["acc_matrix"]).diagonal()[1:].mean() < 0.9
