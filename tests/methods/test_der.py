"""Dark Experience Replay: bad values, insertion-time logits, behaviour on the synthetic blobs."""

from __future__ import annotations

import pytest
import torch
from helpers.methods import capture

from cl_lightning.errors import ConfigError
from cl_lightning.methods.der import DER
from cl_lightning.train import train

SMALL = ["method=der", "method.buffer_size=50", "method.replay_batch_size=16", "logger=none"]
ONLINE = ["dataset.stream=online", "epochs_per_task=1"]


@pytest.mark.parametrize(
    ("override", "message"),
    [("method.alpha=-0.5", "method.alpha=-0.5: must be a number >= 0"), ("method.buffer_size=0", "method.buffer_size")],
)
def test_bad_values_name_the_key(make_cfg, override: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        train(make_cfg("method=der", override, "logger=none"))
    assert message in str(info.value) and "\n" not in str(info.value)


def test_stores_the_logits_of_insertion_time_and_never_refreshes_them(make_cfg, monkeypatch) -> None:
    # One pass over an online stream: every sample is seen (and possibly inserted) exactly once, so the logits the
    # network gave it at that step identify what the buffer must hold, however long training goes on afterwards.
    seen: dict[tuple[int, ...], torch.Tensor] = {}
    modules: list = []
    original = DER.loss_terms

    def record(self, pl_module, batch, logits):
        for x, z in zip(batch.x, logits.detach(), strict=True):
            seen[tuple(x.flatten().tolist())] = z.clone()
        modules.append(pl_module)
        return original(self, pl_module, batch, logits)

    monkeypatch.setattr(DER, "loss_terms", record)
    methods = capture(monkeypatch, DER)
    train(make_cfg(*SMALL, *ONLINE))
    buf = methods[0].buffer
    assert len(buf) == 50 and buf.logits is not None and buf.logits.shape == (50, 10)
    stored = torch.stack([seen[tuple(x.flatten().tolist())] for x in buf.x])
    assert torch.equal(buf.logits, stored), "exactly the logits computed when the sample was inserted"
    module = modules[-1]
    with torch.no_grad():
        now = module.net(module.prepare(buf.x))
    assert not torch.allclose(now, buf.logits, atol=1e-3), "the network moved on; the targets did not"


def test_forgets_less_than_naive_in_class_il(make_cfg) -> None:
    naive = train(make_cfg("logger=none"))
    der = train(make_cfg(*SMALL))
    assert der["avg_acc"] > naive["avg_acc"] + 0.2 and der["forgetting"] < naive["forgetting"] - 0.2


@pytest.mark.parametrize("scenario", ["task_il", "domain_il"])
def test_runs_in_every_scenario_and_task_free(make_cfg, scenario: str) -> None:
    results = train(make_cfg(*SMALL, f"dataset.scenario={scenario}"))
    assert results["avg_acc"] > 0.8
    assert len(train(make_cfg(*SMALL, *ONLINE, f"dataset.scenario={scenario}"))["acc_matrix"]) == 5
