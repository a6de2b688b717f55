"""LUCIR: cosine classifier, imprinted new weights and fixed old ones, the less-forget constraint, the margin ranking
loss, evaluation over the classes seen (instantiation, state round trip, resume and DDP: ``tests/test_contract.py``)."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from cl_lightning.errors import ConfigError
from cl_lightning.methods.lucir import LUCIR
from cl_lightning.methods.replay import task_features
from cl_lightning.models.backbones import CosineLinear
from cl_lightning.train import train

QUICK = ["method=lucir", "logger=none", "method.buffer_size=40", "epochs_per_task=2"]


def head_weight(cfg) -> torch.Tensor:
    ckpt = torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)
    return ckpt["state_dict"]["net.head.weight"]


def test_the_method_brings_a_cosine_classifier_and_refuses_a_linear_one(make_cfg) -> None:
    run = train(make_cfg(*QUICK, "max_tasks=1"))
    assert isinstance(run.module.net.head, CosineLinear)
    with pytest.raises(ConfigError, match="cosine classifier"):
        train(make_cfg(*QUICK, "model=mlp"))


def test_old_classes_weights_stay_fixed_and_new_ones_learn(make_cfg) -> None:
    """Their code trains the old classes' weights with learning rate 0; a resumed fit holds them too."""
    cfg = make_cfg(*QUICK, "max_tasks=1")
    train(cfg)
    after_first = head_weight(cfg)
    train(make_cfg("resume=" + cfg.paths.output_dir, "logger=none", "max_tasks=1"))
    after_second = head_weight(cfg)
    assert torch.equal(after_second[:2], after_first[:2]), "task 0's classes"
    assert not torch.equal(after_second[2:4], after_first[2:4]), "task 1's classes trained"


def test_new_classes_are_imprinted_with_their_mean_feature(make_cfg, monkeypatch) -> None:
    seen: list[tuple[int, torch.Tensor, torch.Tensor]] = []
    imprint = LUCIR._imprint

    def recording(self, trainer, pl_module, task_id):
        before = pl_module.net.head.weight.detach().clone()
        imprint(self, trainer, pl_module, task_id)
        data = trainer.datamodule.tasks[task_id]
        feats = F.normalize(task_features(pl_module, data.train_x), dim=1)
        expected = before.clone()
        norm = before[pl_module.output_masks[:task_id].any(0)].norm(dim=1).mean()
        for c in data.train_y.unique():
            expected[c] = F.normalize(feats[data.train_y == c].mean(0), dim=0) * norm
        seen.append((task_id, pl_module.net.head.weight.detach().clone(), expected))

    monkeypatch.setattr(LUCIR, "_imprint", recording)
    train(make_cfg(*QUICK, "max_tasks=3"))
    assert [t for t, _, _ in seen] == [1, 2], "at every task start after the first"
    for _, got, expected in seen:
        torch.testing.assert_close(got, expected)


def test_less_forget_weight_grows_with_the_old_classes_and_starts_at_zero(make_cfg, monkeypatch) -> None:
    terms_seen: list[tuple[int, float, float]] = []
    terms = LUCIR.replay_terms

    def recording(self, pl_module, batch, logits):
        out = terms(self, pl_module, batch, logits)
        if "less_forget" in out:
            terms_seen.append((int(pl_module.current_task), self._lambda, float(out["less_forget"].detach())))
        return out

    monkeypatch.setattr(LUCIR, "replay_terms", recording)
    train(make_cfg(*QUICK, "max_tasks=3", "method.lambda_base=2.0"))
    lambdas = {t: lam for t, lam, _ in terms_seen}
    assert lambdas == pytest.approx({1: 2.0 * math.sqrt(2 / 2), 2: 2.0 * math.sqrt(4 / 2)})
    first = next(v for t, _, v in terms_seen if t == 1)
    assert first == pytest.approx(0.0, abs=1e-6), "the network is the teacher before task 1's first step"
    assert max(v for t, _, v in terms_seen if t == 1) > 1e-4


def test_margin_loss_ranks_the_k_hardest_new_classes_below_the_true_one() -> None:
    cos = torch.tensor([[0.9, 0.1, 0.5, 0.45, -0.2], [0.0, 0.2, 0.1, 0.9, 0.3]])
    loss = LUCIR.margin_loss(cos, torch.tensor([0, 1]), torch.tensor([2, 3, 4]), margin=0.5, k=2)
    # sample 0: (0.5 - 0.9 + 0.5) + (0.5 - 0.9 + 0.45) = 0.1 + 0.05; sample 1: (0.5 - 0.2 + 0.9) + (0.5 - 0.2 + 0.3)
    assert float(loss) == pytest.approx((0.15 + 1.8) / 2)


def test_evaluation_predicts_among_the_classes_seen() -> None:
    lucir = LUCIR()
    seen = torch.tensor([True, True, False])
    module = SimpleNamespace(eval_row=0, seen_mask=lambda: seen)
    logits = torch.tensor([[0.1, 0.2, 5.0]])
    assert lucir.eval_scores(module, torch.zeros(1, 2), 0, logits).argmax(1).item() == 1  # type: ignore[arg-type]
    module.eval_row = -1  # the random network: all outputs, the baseline of forward transfer
    assert lucir.eval_scores(module, torch.zeros(1, 2), 0, logits).argmax(1).item() == 2  # type: ignore[arg-type]


def test_learns_and_reports_the_nme_classifier(make_cfg) -> None:
    run = train(make_cfg(*QUICK))
    assert run["avg_acc"] > 0.8, run["avg_acc"]
    nme = run["diagnostics"]["lucir"]["nme_acc"]
    assert len(nme) == 5 and min(nme) > 0.5, nme
