"""Penalty strengths: `auto` defaults that plain SGD is stable with; typed values used as typed, warned about."""

from __future__ import annotations

import logging
import warnings
from types import SimpleNamespace

import pytest
import torch
from hydra.utils import instantiate

from cl_lightning.errors import ConfigError
from cl_lightning.methods.strength import AUTO, Strength
from cl_lightning.train import train

# method -> (strength key, the value ``auto`` stands for where plain SGD is stable)
REGULARISERS = {"ewc": ("lambda_", 100.0), "online_ewc": ("lambda_", 100.0), "si": ("c", 1.0), "mas": ("lambda_", 0.03)}


def trainer_with(optimizer: torch.optim.Optimizer) -> SimpleNamespace:
    return SimpleNamespace(optimizers=[optimizer], is_global_zero=True)


def sgd(lr: float, momentum: float = 0.0) -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr, momentum=momentum)


def test_auto_is_its_reference_where_sgd_is_stable(caplog) -> None:
    strength = Strength("method.lambda_", AUTO, reference=100.0)
    assert strength.auto and strength.value == 100.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        strength.consolidate(trainer_with(sgd(0.1)), "ewc", unit_curvature=0.05)  # lr * 100 * 0.05 = 0.5 <= 1
    assert strength.value == 100.0 and not caplog.records


def test_auto_is_capped_at_half_of_sgds_stability_bound_and_says_so(caplog) -> None:
    strength = Strength("method.lambda_", AUTO, reference=100.0)
    with caplog.at_level(logging.INFO), warnings.catch_warnings():
        warnings.simplefilter("error")
        strength.consolidate(trainer_with(sgd(0.1, momentum=0.5)), "ewc", unit_curvature=1.0)
    # SGD diverges on a quadratic of curvature h when lr * h > 2 (1 + momentum); auto keeps lr * h at 1 + momentum
    assert strength.value == pytest.approx(1.5 / (0.1 * 1.0))
    (record,) = caplog.records
    assert "method.lambda_=auto" in record.getMessage() and "15" in record.getMessage()
    # the cap follows the importance down and up again: never above the reference
    strength.consolidate(trainer_with(sgd(0.1, momentum=0.5)), "ewc", unit_curvature=1e-6)
    assert strength.value == 100.0


def test_auto_with_an_adaptive_optimizer_is_the_reference() -> None:
    strength = Strength("method.c", AUTO, reference=1.0)
    adam = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        strength.consolidate(trainer_with(adam), "si", unit_curvature=1e9)
    assert strength.value == 1.0


def test_a_typed_value_is_used_as_typed_and_warned_about_when_sgd_diverges_on_it() -> None:
    strength = Strength("method.lambda_", 100.0, reference=3.0)
    assert not strength.auto and strength.value == 100.0
    with pytest.warns(UserWarning, match=r"method.lambda_=100: .*at most 20\)") as record:
        strength.consolidate(trainer_with(sgd(0.1)), "ewc", unit_curvature=1.0)  # lr * 100 * 1 = 10 > 2
    assert len(record) == 1 and strength.value == 100.0, "never replaced"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        strength.consolidate(trainer_with(sgd(0.1)), "ewc", unit_curvature=0.1)  # lr * 100 * 0.1 = 1 <= 2: silent


@pytest.mark.parametrize("value", ["fast", -1.0, float("inf"), True])
def test_bad_values_name_the_key(value: object) -> None:
    with pytest.raises(ConfigError, match=r"method.lambda_=.*: must be a number >= 0 or auto"):
        Strength("method.lambda_", value, reference=1.0)  # type: ignore[arg-type]


def test_state_keeps_the_strength_an_auto_run_chose() -> None:
    strength = Strength("method.lambda_", AUTO, reference=100.0)
    strength.consolidate(trainer_with(sgd(1.0)), "ewc", unit_curvature=1.0)
    restored = Strength("method.lambda_", AUTO, reference=100.0)
    restored.load(strength.state())
    assert restored.value == strength.value == 1.0
    typed = Strength("method.lambda_", 7.0, reference=100.0)
    typed.load(1.0)
    assert typed.value == 7.0, "a typed value is the config's, whatever the checkpoint says"


@pytest.mark.parametrize("method", sorted(REGULARISERS))
def test_config_default_is_auto(make_cfg, method: str) -> None:
    key, reference = REGULARISERS[method]
    cfg = make_cfg(f"method={method}")
    assert cfg.method[key] == AUTO
    instance = instantiate(cfg.method)
    assert getattr(instance, key) == reference and instance.strength.auto


@pytest.fixture(scope="module")
def naive_on_the_default(tmp_path_factory) -> dict:
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from cl_lightning.train import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["method=naive", "logger=none", "trainer.enable_progress_bar=false"])
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path_factory.mktemp("naive"))
    return train(cfg)


@pytest.mark.parametrize("method", sorted(REGULARISERS))
def test_default_trains_with_the_default_sgd_on_the_embedded_default(make_cfg, naive_on_the_default, method) -> None:
    """``python -m cl_lightning method=<m>`` with nothing else: split_digits, class-IL, SGD lr 0.1. It trains (no
    divergence, no stiffness warning), ends near fine-tuning (class-IL regularisers do, van de Ven & Tolias 2019)
    and the strength is the reference at every task (the cap never binds here)."""
    key, reference = REGULARISERS[method]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = train(
            make_cfg(f"method={method}", "logger=none", "trainer.enable_progress_bar=false", synthetic=False)
        )
    stiff = [str(w.message) for w in caught if "SGD" in str(w.message) or "diverg" in str(w.message)]
    assert not stiff, stiff
    assert results["complete"] and abs(results["avg_acc"] - naive_on_the_default["avg_acc"]) <= 0.05
    assert results["diagnostics"][method][key] == reference


def test_auto_caps_where_the_reference_would_diverge(make_cfg, caplog) -> None:
    """On the synthetic blobs at SGD lr 1, EWC's reference strength is past SGD's bound: typed, it is used and
    warned about; ``auto`` lowers it for the next task, says so, and the run trains."""
    run = ["method=ewc", "logger=none", "optimizer.lr=1.0", "max_tasks=2"]
    with pytest.warns(UserWarning, match="SGD diverges on the penalty"):
        typed = train(make_cfg(*run, "method.lambda_=100"))
    assert typed["diagnostics"]["ewc"]["lambda_"] == 100.0
    with caplog.at_level(logging.INFO), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        auto = train(make_cfg(*run))
    assert not [w for w in caught if "SGD" in str(w.message)]
    assert auto["tasks_completed"] == 2 and auto["diagnostics"]["ewc"]["lambda_"] < 100.0
    assert any("method.lambda_=auto" in r.getMessage() for r in caplog.records)
