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

    class Recorded(module.L2Anchor):  # keeps every task's anchor, to measure the drift over the last task
        def on_task_end(self, trainer, pl_module, task_id):
            super().on_task_end(trainer, pl_module, task_id)
            self.history = [*getattr(self, "history", []), self.anchor]

    module.Recorded = Recorded
    loose = train(make_cfg("method._target_=readme_example.Recorded", "+method.strength=0.0", "logger=none"))
    stiff = train(make_cfg("method._target_=readme_example.Recorded", "+method.strength=4.0", "logger=none"))
    assert loose["method"] == "l2"
    # a pull towards the last task's weights (stable under SGD lr 0.1: lr x 2 x strength < 2) keeps the network
    # near them and holds the new task back; train() returns the built objects beside the results

    def drift(run) -> float:
        anchor = run.methods[0].history[-2]  # the weights at the end of the next-to-last task
        return sum(float(((p - anchor[n]) ** 2).sum()) for n, p in run.module.net.named_parameters())

    assert drift(stiff) < 0.5 * drift(loose)
    assert torch.tensor(stiff["acc_matrix"]).diagonal()[1:].mean() < 0.9
