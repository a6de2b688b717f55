"""Deep generative replay: bad values, the generator learns the blobs, pseudo-labels of the previous model by
scenario, the image grid in TensorBoard, the frozen copies in the checkpoint, class-IL resume."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from helpers.methods import assert_resume_parity
from helpers.synthetic import blobs
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cl_lightning.core.vae import VAE
from cl_lightning.errors import ConfigError
from cl_lightning.methods.dgr import DGR
from cl_lightning.models.backbones import MLP
from cl_lightning.train import train

SMALL = ["method=dgr", "method.hidden=[32]", "method.z_dim=2", "method.generator_lr=0.01", "logger=none"]
# blobs of 8x8 pixels and longer tasks: enough signal and steps for a small VAE to learn each task
LEARNABLE = ["+dataset.source.side=8", "optimizer=adam", "optimizer.lr=0.01", "method.hidden=[64]"]
KEY = "DGR[dgr]"


def checkpoint(cfg) -> dict:
    return torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("method.temperature=0", "method.temperature=0: must be a number > 0"),
        ("method.replay_ratio=0", "method.replay_ratio=0: must be a number > 0"),
        ("method.replay_weight=-1", "method.replay_weight=-1: must be a number >= 0"),
        ("method.distill=1", "method.distill=1: must be true or false"),
        ("method.class_mean=yes", "method.class_mean='yes': must be true or false"),
        ("method.z_dim=0", "method.z_dim=0: must be an integer >= 1"),
        ("method.hidden=[0]", "method.hidden=[0]"),
        ("method.generator_lr=0", "method.generator_lr=0"),
        ("method.sample_grid=-1", "method.sample_grid=-1"),
    ],
)
def test_bad_values_name_the_key(make_cfg, override: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        train(make_cfg("method=dgr", override, "logger=none"))
    assert message in str(info.value) and "\n" not in str(info.value)


def test_refuses_an_online_stream(make_cfg) -> None:
    with pytest.raises(ConfigError, match="dataset.stream=online"):
        train(make_cfg(*SMALL, "dataset.stream=online", "epochs_per_task=1"))


def test_generator_samples_land_near_the_blobs_of_the_task(make_cfg) -> None:
    cfg = make_cfg(*SMALL, *LEARNABLE, "epochs_per_task=60", "max_tasks=1")
    train(cfg)
    state = checkpoint(cfg)["callbacks"][KEY]
    vae = VAE(64, hidden=(64,), z_dim=2)
    vae.load_state_dict(state["prev_generator"])  # the generator frozen at the task end, replayed in task 1
    data = blobs(side=8)
    x, y = data.train_x.flatten(1).float() / 255, data.train_y
    centres = torch.stack([x[y == c].mean(0) for c in (0, 1)])  # task 0: the blobs of classes 0 and 1
    samples = vae.sample(400, torch.Generator().manual_seed(0))
    dist = torch.cdist(samples, centres) / torch.dist(*centres)
    close = dist.min(1).values < 0.25
    assert close.float().mean() > 0.75 and dist.min(1).values.median() < 0.125, "samples land on the blobs"
    assert min(torch.bincount(dist.argmin(1)[close], minlength=2).tolist()) > 100, "both blobs are generated"


def record_replay(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """Every replay loss computed: the replayed samples, the (masked) student and teacher logits, the loss."""
    calls: list[dict] = []
    target_loss, loss_terms = DGR._target_loss, DGR.loss_terms

    def record_target(self, student, teacher):
        loss = target_loss(self, student, teacher)
        calls.append({"student": student.detach(), "teacher": teacher, "loss": loss.detach()})
        return loss

    def record_terms(self, pl_module, batch, logits):
        terms = loss_terms(self, pl_module, batch, logits)
        for call in calls:
            call.setdefault("x", self._replay_x)
        return terms

    monkeypatch.setattr(DGR, "_target_loss", record_target)
    monkeypatch.setattr(DGR, "loss_terms", record_terms)
    return calls


@pytest.mark.parametrize(
    ("scenario", "tasks_before", "allowed"),
    [
        ("class_il", 1, [[0, 1]]),  # the classes of the previous tasks, those the previous model learned
        ("domain_il", 1, [[0, 1]]),  # the shared head
        ("task_il", 2, [[0, 1], [2, 3]]),  # the samples replayed once per previous task, with its head
    ],
)
@pytest.mark.parametrize(("distill", "class_mean"), [(False, True), (True, True), (True, False)])
def test_pseudo_labels_come_from_the_previous_model(
    make_cfg, monkeypatch, scenario: str, tasks_before: int, allowed: list[list[int]], distill: bool, class_mean: bool
) -> None:
    common = [*SMALL, f"dataset.scenario={scenario}", f"method.distill={str(distill).lower()}", "epochs_per_task=2",
              f"method.class_mean={str(class_mean).lower()}"]  # fmt: skip
    first = make_cfg(*common, f"max_tasks={tasks_before}")
    train(first)
    ckpt = checkpoint(first)
    weights = {k.removeprefix("net."): v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
    previous = MLP((1, 4, 4), weights["head.weight"].shape[0], hidden=(400, 400))
    previous.load_state_dict(weights)  # the network at the end of the last task trained
    calls = record_replay(monkeypatch)
    train(make_cfg("resume=" + first.paths.output_dir, "logger=none", "max_tasks=1"))
    assert len(calls) == 10 * len(allowed), "one replay loss per step and previous task (10 steps)"
    n_out = previous.head.out_features
    for i, call in enumerate(calls):
        outputs = allowed[i % len(allowed)]
        x = call["x"]
        assert x.shape == (16, 1, 4, 4) and x.min() >= 0 and x.max() <= 1, "generated pixels, a current batch's size"
        with torch.no_grad():
            expected = previous(x)
        mask = torch.zeros(n_out, dtype=torch.bool)
        mask[outputs] = True
        teacher = call["teacher"]
        assert torch.isinf(teacher[:, ~mask]).all(), "only the allowed outputs"
        assert torch.allclose(teacher[:, mask], expected[:, mask], atol=1e-5), "the previous model's logits"
        student = call["student"]
        labels = teacher.argmax(1)
        assert set(labels.tolist()) <= set(outputs)
        if not distill:
            assert torch.allclose(call["loss"], F.cross_entropy(student, labels), atol=1e-6)
        else:
            p = F.softmax(expected[:, mask] / 2, 1)
            log_q = F.log_softmax(student / 2, 1)[:, mask]
            # the student's classes: those seen (class-IL, 2 tasks), the shared head's or the replayed task's 2
            k = {"class_il": 4, "domain_il": 2, "task_il": 2}[scenario] if class_mean else 1
            assert int(torch.isfinite(student[0]).sum()) == {"class_il": 4, "domain_il": 2, "task_il": 2}[scenario]
            expected_loss = -(p * log_q).sum(1).mean() * 4 / k
            assert torch.allclose(call["loss"], expected_loss, atol=1e-5), "T^2 soft CE, T = 2, over the K classes"
        if scenario == "class_il":
            assert torch.isfinite(student[:, :4]).all() and torch.isinf(student[:, 4:]).all(), "seen classes"


def test_replay_weight_is_the_number_of_previous_tasks_unless_set() -> None:
    masks = torch.zeros(5, 10, dtype=torch.bool)
    for t in range(5):
        masks[t, 2 * t : 2 * t + 2] = True
    module = SimpleNamespace(current_task=torch.tensor(3), output_masks=masks, scenario="class_il")
    groups, weight = DGR()._replay_groups(module)  # type: ignore[arg-type]
    assert weight == 3.0 and len(groups) == 1 and groups[0][1].nonzero().flatten().tolist() == list(range(6))
    assert DGR(replay_weight=0.5)._replay_groups(module)[1] == 0.5  # type: ignore[arg-type]
    module.current_task = torch.tensor(0)
    assert DGR()._replay_groups(module) == ([], 0.0)  # type: ignore[arg-type]


@pytest.mark.slow
def test_forgets_less_than_naive_in_class_il(make_cfg) -> None:
    common = [*LEARNABLE, "epochs_per_task=30", "logger=none"]
    naive = train(make_cfg(*common[:3], "epochs_per_task=30", "logger=none"))
    dgr = train(make_cfg(*SMALL, *common))
    assert dgr["avg_acc"] > naive["avg_acc"] + 0.3 and dgr["forgetting"] < naive["forgetting"] - 0.3
    diagnostics = dgr["diagnostics"]["dgr"]
    assert diagnostics["replayed_per_step"] == 16 and 0 < diagnostics["generator_kl"] < diagnostics["generator_recon"]


def test_generated_samples_appear_in_tensorboard_at_every_task_end(make_cfg) -> None:
    cfg = make_cfg(*SMALL[:-1], "method.sample_grid=9", "logger=tensorboard", "max_tasks=2", "epochs_per_task=2")
    train(cfg)
    events = EventAccumulator(str(Path(cfg.paths.output_dir) / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    images = events.Images("dgr/generator_samples")
    assert len(images) == 2 and images[0].step < images[1].step, "one grid per task end"
    # 9 samples of 4x4 pixels in a 3x3 grid with 2-pixel padding
    assert (images[0].width, images[0].height) == (3 * 6 + 2, 3 * 6 + 2)
    assert "train/dgr/generator_recon" in events.Tags()["scalars"]


def test_the_checkpoint_holds_the_copies_frozen_at_the_task_end(make_cfg) -> None:
    cfg = make_cfg(*SMALL, "max_tasks=2", "epochs_per_task=2")
    train(cfg)
    ckpt = checkpoint(cfg)
    state = ckpt["callbacks"][KEY]
    assert state["copied"] == 1 and state["rng"].dtype == torch.uint8
    assert state["generator"]["to_mu.weight"].shape == (2, 32)
    for name, value in state["generator"].items():
        assert torch.equal(value, state["prev_generator"][name]), "frozen at the task end: the generator as it was"
    for name, value in state["prev_solver"].items():
        assert torch.equal(value, ckpt["state_dict"][f"net.{name}"]), "the solver at the task end"
    assert state["optimizer"]["state"][0]["exp_avg"].shape == state["generator"]["encoder.0.weight"].shape


def test_resume_after_a_task_equals_the_uninterrupted_run_in_class_il_with_distillation(make_cfg) -> None:
    # task-IL without distillation is tests/test_contract.py's; class-IL replays over the previous tasks' classes
    assert_resume_parity(make_cfg, *SMALL, "dataset.scenario=class_il", "epochs_per_task=2", "method.distill=true")
