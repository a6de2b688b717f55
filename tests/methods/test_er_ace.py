"""ER-ACE: the incoming batch's cross-entropy over its own classes only (asymmetric), the replay's over the seen
classes (instantiation, state round trip, resume and DDP: ``tests/test_contract.py``)."""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F

from cl_lightning.methods.er_ace import ERACE
from cl_lightning.train import train

ONLINE = ["dataset.stream=online", "epochs_per_task=1", "logger=none"]


def test_the_incoming_loss_runs_over_the_batch_classes_and_leaves_the_others_untouched() -> None:
    module = SimpleNamespace(training_logits=lambda z, tid: z)
    logits = torch.randn(4, 6, requires_grad=True)
    batch = SimpleNamespace(y=torch.tensor([4, 5, 5, 4]), task_id=torch.full((4,), -1))
    loss = ERACE.incoming_loss(module, batch, logits)  # type: ignore[arg-type]
    expected = F.cross_entropy(logits[:, 4:], batch.y - 4)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert logits.grad is not None
    assert (logits.grad[:, :4] == 0).all(), "the old classes' logits get no gradient from the new batch"
    assert (logits.grad[:, 4:] != 0).any()


def test_er_ace_keeps_more_than_er_on_an_online_stream(make_cfg) -> None:
    """The paper's claim at small scale (Caccia et al. 2022, Table 1): the asymmetric loss forgets less."""
    er = train(make_cfg(*ONLINE, "method=er"))
    ace = train(make_cfg(*ONLINE, "method=er_ace"))
    assert ace["avg_acc"] > er["avg_acc"] and ace["forgetting"] < er["forgetting"], (ace["avg_acc"], er["avg_acc"])


def test_er_ace_is_the_whole_objective(make_cfg, monkeypatch) -> None:
    seen: list[set[str]] = []
    terms = ERACE.replay_terms

    def recording(self, pl_module, batch, logits):
        out = terms(self, pl_module, batch, logits)
        seen.append(set(out))
        return out

    monkeypatch.setattr(ERACE, "replay_terms", recording)
    run = train(make_cfg(*ONLINE, "method=er_ace"))
    assert seen[0] == {"incoming"} and seen[-1] == {"incoming", "replay"}, "plain CE until the buffer holds samples"
    assert run.methods[0].replaces_task_loss()
