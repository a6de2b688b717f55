"""DER++: its two independent replay batches, its weights, behaviour on the synthetic blobs."""

from __future__ import annotations

import pytest
import torch

from cl_lightning.core.buffer import Buffer
from cl_lightning.errors import ConfigError
from cl_lightning.methods.derpp import DERpp
from cl_lightning.train import train

SMALL = ["method=derpp", "method.buffer_size=50", "method.replay_batch_size=16", "logger=none"]


def test_bad_beta_names_the_key(make_cfg) -> None:
    with pytest.raises(ConfigError, match=r"method.beta='x': must be a number >= 0"):
        train(make_cfg("method=derpp", "method.beta=x", "logger=none"))


def test_two_independent_replay_batches_and_both_terms(make_cfg, monkeypatch) -> None:
    draws: list[torch.Tensor] = []
    terms: list[set[str]] = []
    sample, loss_terms = Buffer.sample, DERpp.loss_terms

    def logged_sample(self, n, generator=None):
        out = sample(self, n, generator)
        draws.append(out.slots)
        return out

    def logged_terms(self, pl_module, batch, logits):
        out = loss_terms(self, pl_module, batch, logits)
        terms.append(set(out))
        return out

    monkeypatch.setattr(Buffer, "sample", logged_sample)
    monkeypatch.setattr(DERpp, "loss_terms", logged_terms)
    train(make_cfg(*SMALL, "max_tasks=2"))
    assert terms[0] == set() and all(t == {"logit_mse", "replay"} for t in terms[1:])
    assert len(draws) == 2 * (len(terms) - 1), "batch A for the logits, batch B for the labels, every step"
    full = [(a, b) for a, b in zip(draws[::2], draws[1::2], strict=True) if len(a) == 16]
    assert any(not torch.equal(a, b) for a, b in full), "B is drawn independently of A"


def test_zero_weights_switch_the_terms_off(make_cfg, monkeypatch) -> None:
    values: list[dict[str, float]] = []
    loss_terms = DERpp.loss_terms

    def logged(self, pl_module, batch, logits):
        out = loss_terms(self, pl_module, batch, logits)
        values.append({k: float(v.detach()) for k, v in out.items()})
        return out

    monkeypatch.setattr(DERpp, "loss_terms", logged)
    train(make_cfg(*SMALL, "method.beta=0", "method.alpha=0", "max_tasks=2"))
    assert all(v == 0.0 for step in values for v in step.values()), "alpha = beta = 0 is plain fine-tuning"


def test_forgets_less_than_naive_in_class_il(make_cfg) -> None:
    naive = train(make_cfg("logger=none"))
    derpp = train(make_cfg(*SMALL))
    assert derpp["avg_acc"] > naive["avg_acc"] + 0.3 and derpp["forgetting"] < naive["forgetting"] - 0.3


@pytest.mark.parametrize("scenario", ["task_il", "domain_il"])
def test_runs_in_every_scenario_and_task_free(make_cfg, scenario: str) -> None:
    assert train(make_cfg(*SMALL, f"dataset.scenario={scenario}"))["avg_acc"] > 0.8
    online = train(make_cfg(*SMALL, "dataset.stream=online", "epochs_per_task=1", f"dataset.scenario={scenario}"))
    assert len(online["acc_matrix"]) == 5
