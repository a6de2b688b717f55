"""Presets carry the papers' values (convention 15): `experiment=<protocol> method=<m>` alone gives m the values of
that protocol's paper (or Mammoth's best arguments), per scenario where they differ, and every row of
`benchmarks/reproduce.py` resolves to exactly the values it ran with.

The expected values below are copied from the override strings the tables carried before the presets did (and from
the method defaults those rows relied on), with two intentional changes: ER takes Mammoth's learning rates directly
(its loss is one mean over the union of current and replayed samples, as Mammoth and Chaudhry et al.; the old sum of
two means took twice the step), and the van de Ven & Tolias preset keeps one Adam across tasks as their code does.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from cl_lightning.config_resolvers import register_resolvers
from cl_lightning.data.scenarios import SCENARIOS
from cl_lightning.train import CONFIG_DIR, train

register_resolvers()

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("reproduce", REPO / "benchmarks" / "reproduce.py")
assert _spec is not None and _spec.loader is not None
reproduce = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(reproduce)

CONF = Path(CONFIG_DIR)
PRESET_FILES = sorted(p.relative_to(CONF / "experiment_method").with_suffix("") for p in
                      (CONF / "experiment_method").glob("*/*.yaml"))  # fmt: skip
SGD, ADAM = "torch.optim.SGD", "torch.optim.Adam"
MLP, PNN_MLP, RESNET = (
    "cl_lightning.models.backbones.MLP", "cl_lightning.models.progressive.ProgressiveMLP",
    "cl_lightning.models.backbones.ResNet18Reduced",
)  # fmt: skip

# What every row of a protocol runs with (the experiment preset's values).
PROTOCOLS: dict[str, dict[str, Any]] = {
    "vdv_split_mnist": {
        "dataset.name": "split_mnist", "dataset.n_tasks": 5, "model.hidden": [400, 400], "model.init": "default",
        "optimizer._target_": ADAM, "optimizer.lr": 0.001, "batch_size": 128, "steps_per_task": 2000,
        "module.reset_optimizer": False, "module.train_outputs": "seen",
    },
    "der_split_mnist": {
        "dataset.name": "split_mnist", "dataset.n_tasks": 5, "model._target_": MLP, "model.hidden": [100, 100],
        "model.init": "xavier", "optimizer._target_": SGD, "optimizer.lr": 0.03, "batch_size": 10,
        "epochs_per_task": 1, "steps_per_task": None, "module.reset_optimizer": True, "module.train_outputs": "all",
    },
    "der_split_fmnist": {
        "dataset.name": "split_fmnist", "dataset.n_tasks": 5, "model._target_": MLP, "model.hidden": [100, 100],
        "model.init": "xavier", "optimizer._target_": SGD, "optimizer.lr": 0.03, "batch_size": 10,
        "epochs_per_task": 1, "steps_per_task": None, "module.reset_optimizer": True, "module.train_outputs": "all",
    },
    "der_permuted_mnist": {
        "dataset.name": "permuted_mnist", "dataset.n_tasks": 20, "dataset.scenario": "domain_il",
        "model._target_": MLP, "model.hidden": [100, 100], "model.init": "xavier", "optimizer._target_": SGD,
        "optimizer.lr": 0.2, "batch_size": 128, "epochs_per_task": 1, "steps_per_task": None,
        "module.reset_optimizer": True,
    },
    "der_rotated_mnist": {
        "dataset.name": "rotated_mnist", "dataset.n_tasks": 20, "dataset.scenario": "domain_il",
        "dataset.angles": "uniform", "model._target_": MLP, "model.hidden": [100, 100], "model.init": "xavier",
        "optimizer._target_": SGD, "optimizer.lr": 0.2, "batch_size": 128, "epochs_per_task": 1,
        "steps_per_task": None, "module.reset_optimizer": True,
    },
    "der_split_cifar10": {
        "dataset.name": "split_cifar10", "dataset.n_tasks": 5, "dataset.scenario": "class_il",
        "dataset.augment": "crop_flip", "model._target_": RESNET, "model.nf": 64, "optimizer._target_": SGD,
        "optimizer.lr": 0.1, "batch_size": 32, "epochs_per_task": 50, "steps_per_task": None,
        "module.reset_optimizer": True, "module.train_outputs": "all",
    },
    "online_split_mnist": {
        "dataset.name": "split_mnist", "dataset.n_tasks": 5, "dataset.scenario": "class_il", "dataset.stream": "online",
        "dataset.blur": 0.0, "dataset.max_samples_per_task": 1000, "model._target_": MLP, "model.hidden": [400, 400],
        "optimizer._target_": SGD, "optimizer.lr": 0.1, "batch_size": 10, "epochs_per_task": 1,
        "module.train_outputs": "all",
    },
    "gdumb_split_mnist": {
        "dataset.name": "split_mnist", "dataset.n_tasks": 5, "dataset.scenario": "class_il", "model._target_": MLP,
        "model.hidden": [400, 400], "model.batch_norm": True, "epochs_per_task": 1, "batch_size": 128,
        "dataset.augment": "crop",
    },
    "agem_permuted_mnist": {
        "dataset.name": "permuted_mnist", "dataset.n_tasks": 17, "dataset.max_samples_per_task": 55000,
        "model.hidden": [256, 256], "optimizer._target_": SGD, "optimizer.lr": 0.1, "batch_size": 10,
        "epochs_per_task": 1, "steps_per_task": None,
    },
}  # fmt: skip

# van de Ven & Tolias (2019), their param_values.py, per scenario (online EWC: their lambda times gamma is ours)
VDV_EWC = {"method.fisher": "exact", "method.fisher_samples": 200}
VDV = {
    "task_il": {
        "ewc": {"method.lambda_": 1e7, **VDV_EWC},
        "online_ewc": {"method.lambda_": 8e7, "method.gamma": 0.8, **VDV_EWC},
        "si": {"method.c": 50.0, "method.xi": 0.1},
    },
    "domain_il": {
        "ewc": {"method.lambda_": 1e6, **VDV_EWC},
        "online_ewc": {"method.lambda_": 7e7, "method.gamma": 0.7, **VDV_EWC},
        "si": {"method.c": 500.0, "method.xi": 0.1},
    },
    "class_il": {
        "ewc": {"method.lambda_": 1e8, **VDV_EWC},
        "online_ewc": {"method.lambda_": 8e8, "method.gamma": 0.8, **VDV_EWC},
        "si": {"method.c": 0.5, "method.xi": 0.1},
    },
}
LWF = {
    "method.alpha": "tasks", "method.temperature": 2.0, "method.class_il_outputs": "seen", "method.class_mean": True,
}  # fmt: skip
DGR = {
    "method.distill": False, "method.temperature": 2.0, "method.class_mean": True, "method.replay_ratio": 1.0,
    "method.replay_weight": None,
    "method.hidden": [400, 400], "method.z_dim": 100, "method.generator_lr": 0.001,
}  # fmt: skip

# (table, method spec) -> the values of that row beyond (or instead of) its protocol's.
DER_SPLIT_MNIST: dict[str, dict[str, Any]] = {
    # Mammoth's seq-mnist best arguments, buffer 500 (Mammoth's minibatch_size is our replay_batch_size)
    "er": {"optimizer.lr": 0.1, "method.buffer_size": 500, "method.replay_batch_size": 10},
    "der": {"method.buffer_size": 500, "method.replay_batch_size": 128, "method.alpha": 1.0},
    "derpp": {
        "method.buffer_size": 500, "method.replay_batch_size": 10, "method.alpha": 1.0, "method.beta": 0.5,
    },
    "gem": {"method.buffer_size": 500, "method.memory_strength": 0.5},
    "agem": {"optimizer.lr": 0.1, "method.buffer_size": 500, "method.replay_batch_size": 128},
    "joint": {},
    "naive": {},
    # no published values: ours (see each preset file)
    "xder": {
        "optimizer.lr": 0.03, "method.buffer_size": 500, "method.replay_batch_size": 10, "method.alpha": 1.0,
        "method.beta": 0.5, "method.gamma": 0.85, "method.eta": 0.1, "method.m": 0.3,
    },
    "bic": {
        "optimizer.lr": 0.03, "method.buffer_size": 500, "method.replay_batch_size": None,
        "method.selection": "herding", "method.val_fraction": 0.1, "method.temperature": 2.0,
        "method.bias_epochs": 200, "method.bias_batch_size": 128, "method.bias_lr": 0.01, "method.bias_momentum": 0.9,
    },
    "lucir": {
        "model.head": "cosine", "method.buffer_size": 500, "method.replay_batch_size": 10, "method.lambda_base": 5.0,
        "method.margin": 0.5, "method.hard_negatives": 2,
    },
}  # fmt: skip

ROWS: dict[tuple[str, str], dict[str, Any]] = {
    ("vdv_split_mnist_task_il", "ewc"): VDV["task_il"]["ewc"],
    ("vdv_split_mnist_task_il", "online_ewc"): VDV["task_il"]["online_ewc"],
    ("vdv_split_mnist_task_il", "si"): VDV["task_il"]["si"],
    ("vdv_split_mnist_task_il", "lwf"): LWF,
    ("vdv_split_mnist_task_il", "pnn"): {"model._target_": PNN_MLP, "model.hidden": [400, 400]},
    ("vdv_split_mnist_task_il", "packnet"): {"method.prune_ratio": 0.8, "method.retrain_epochs": 1},
    ("vdv_split_mnist_domain_il", "ewc"): VDV["domain_il"]["ewc"],
    ("vdv_split_mnist_domain_il", "si"): VDV["domain_il"]["si"],
    ("vdv_split_mnist_domain_il", "lwf"): {**LWF, "method.class_mean": False},  # the sum matches their number
    ("vdv_split_mnist_domain_il", "dgr"): DGR,
    ("vdv_split_mnist_class_il", "ewc"): VDV["class_il"]["ewc"],
    ("vdv_split_mnist_class_il", "online_ewc"): VDV["class_il"]["online_ewc"],
    ("vdv_split_mnist_class_il", "si"): VDV["class_il"]["si"],
    ("vdv_split_mnist_class_il", "lwf"): LWF,
    ("vdv_split_mnist_class_il", "dgr"): DGR,
    ("vdv_split_mnist_class_il", "dgr method.distill=true"): {**DGR, "method.distill": True},
    ("vdv_split_mnist_class_il", "icarl"): {"method.buffer_size": 2000, "method.temperature": 2.0},
    ("der_permuted_mnist_regularization", "online_ewc"): {
        "method.lambda_": 7.0, "method.gamma": 1.0, "method.fisher": "empirical", "method.fisher_samples": 200,
        "optimizer.lr": 0.1,
    },
    ("der_permuted_mnist_regularization", "si"): {"method.c": 0.5, "method.xi": 1.0, "optimizer.lr": 0.1},
    ("der_permuted_mnist_regularization", "naive"): {},
    **{("der_split_mnist", m): values for m, values in DER_SPLIT_MNIST.items()},
    # the DER protocol on Split Fashion-MNIST: every method with its Split-MNIST values
    **{("der_split_fmnist", m): DER_SPLIT_MNIST[m] for m in ("er", "derpp", "joint", "xder", "bic", "lucir")},
    # Mammoth's perm-mnist best arguments, buffer 500. ER: 0.1 with the old sum of two means, Mammoth's 0.2 now.
    ("der_permuted_mnist_replay", "er"): {
        "optimizer.lr": 0.2, "method.buffer_size": 500, "method.replay_batch_size": 128,
    },
    ("der_permuted_mnist_replay", "derpp"): {
        "optimizer.lr": 0.2, "method.buffer_size": 500, "method.replay_batch_size": 128, "method.alpha": 1.0,
        "method.beta": 0.5,
    },
    ("der_permuted_mnist_replay", "gem"): {
        "optimizer.lr": 0.1, "method.buffer_size": 500, "method.memory_strength": 0.5,
    },
    ("der_permuted_mnist_replay", "agem"): {
        "optimizer.lr": 0.1, "method.buffer_size": 500, "method.replay_batch_size": 128,
    },
    # Mammoth's rot-mnist best arguments, buffer 500
    ("der_rotated_mnist", "naive"): {},
    ("der_rotated_mnist", "er"): {"optimizer.lr": 0.2, "method.buffer_size": 500, "method.replay_batch_size": 128},
    ("der_rotated_mnist", "der"): {
        "optimizer.lr": 0.2, "method.buffer_size": 500, "method.replay_batch_size": 128, "method.alpha": 0.5,
    },
    ("der_rotated_mnist", "derpp"): {
        "optimizer.lr": 0.2, "method.buffer_size": 500, "method.replay_batch_size": 128, "method.alpha": 0.5,
        "method.beta": 1.0,
    },
    # Mammoth's seq-cifar10 best arguments, buffer 500
    ("der_split_cifar10", "naive"): {},
    ("der_split_cifar10", "er"): {"optimizer.lr": 0.1, "method.buffer_size": 500, "method.replay_batch_size": 32},
    ("der_split_cifar10", "der"): {
        "optimizer.lr": 0.03, "method.buffer_size": 500, "method.replay_batch_size": 32, "method.alpha": 0.3,
    },
    ("der_split_cifar10", "derpp"): {
        "optimizer.lr": 0.03, "method.buffer_size": 500, "method.replay_batch_size": 32, "method.alpha": 0.2,
        "method.beta": 0.5,
    },
    ("der_split_cifar10", "agem"): {
        "optimizer.lr": 0.03, "method.buffer_size": 500, "method.replay_batch_size": 32,
    },
    ("der_split_cifar10", "gem"): {"optimizer.lr": 0.03, "method.buffer_size": 500, "method.memory_strength": 0.5},
    ("der_split_cifar10", "icarl"): {
        "optimizer.lr": 0.1, "optimizer.weight_decay": 1e-5, "method.buffer_size": 500, "method.classifier": "nme",
    },
    ("der_split_cifar10", "xder"): {
        "optimizer.lr": 0.03, "method.buffer_size": 500, "method.replay_batch_size": 32, "method.alpha": 0.3,
        "method.beta": 0.8,
    },
    ("der_split_cifar10", "bic"): {
        "optimizer.lr": 0.03, "method.buffer_size": 500, "method.val_fraction": 0.1, "method.temperature": 2.0,
    },
    ("agem_permuted_mnist", "pnn"): {"dataset.scenario": "task_il", "model._target_": PNN_MLP},
    # the MIR paper's code (Scripts/ER_experiments.sh, MNIST Split): 50 memories per class, 10 replayed, 50 candidates
    ("online_split_mnist", "er"): {"method.buffer_size": 500, "method.replay_batch_size": 10},
    ("online_split_mnist", "mir"): {"method.buffer_size": 500, "method.replay_batch_size": 10, "method.subsample": 50},
    ("online_split_mnist", "er_ace"): {"method.buffer_size": 500, "method.replay_batch_size": 10},
    # GDumb's scripts/replicate.sh (MNIST, MLP-400, k=500, 128 passes) and opts.py
    ("gdumb_split_mnist", "gdumb"): {
        "method.buffer_size": 500, "method.epochs": 128, "method.batch_size": 16, "method.max_lr": 0.05,
        "method.min_lr": 0.0005, "method.clip": 10.0,
    },
}  # fmt: skip

# A spec may name a variant of a method (DGR+distill is DGR with soft targets), never a hyperparameter.
VARIANT_SWITCHES = {"method.distill=true"}


def compose_cfg(*overrides: str) -> DictConfig:
    """``conf/train.yaml`` composed with ``overrides``, as the command line composes it."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=list(overrides))


def table_rows() -> list[tuple[str, str]]:
    """Every (table, method spec) of ``benchmarks/reproduce.py``."""
    return [(table, spec) for table, (_, _, published, _) in reproduce.TABLES.items() for spec in published]


def experiment_of(table: str) -> str:
    """The ``experiment=`` preset of a table."""
    (experiment,) = [o.split("=", 1)[1] for o in reproduce.TABLES[table][1] if o.startswith("experiment=")]
    return experiment


def row_cfg(table: str, spec: str) -> DictConfig:
    """The config of one row, composed from the same overrides ``reproduce.py`` passes to the command line."""
    name, *variant = spec.split()
    return compose_cfg(*reproduce.TABLES[table][1], f"method={name}", *variant)


def assert_values(cfg: DictConfig, expected: dict[str, Any]) -> None:
    """Every dotted key of ``expected`` resolves to its value (floats to 12 digits, booleans and null exactly)."""
    wrong = {}
    for key, value in expected.items():
        got = OmegaConf.select(cfg, key, throw_on_missing=True)
        got = OmegaConf.to_container(got) if OmegaConf.is_config(got) else got
        if isinstance(value, bool) or value is None:
            same = got is value
        elif isinstance(value, float):
            number = isinstance(got, int | float) and not isinstance(got, bool)
            same = number and math.isclose(got, value, rel_tol=1e-12)
        else:
            same = got == value
        if not same:
            wrong[key] = (got, value)
    assert not wrong, f"(resolved, expected): {wrong}"


def test_every_reproduction_row_is_pinned_here() -> None:
    assert set(table_rows()) == set(ROWS), "a table row without expected values, or expected values without a row"
    assert {experiment_of(t) for t in reproduce.TABLES} == set(PROTOCOLS)


@pytest.mark.parametrize(("table", "spec"), table_rows(), ids=[f"{t}:{s}" for t, s in table_rows()])
def test_reproduction_row_resolves_to_the_values_it_ran_with(table: str, spec: str) -> None:
    cfg = row_cfg(table, spec)
    assert_values(cfg, {**PROTOCOLS[experiment_of(table)], **ROWS[table, spec]})


@pytest.mark.parametrize(("table", "spec"), table_rows(), ids=[f"{t}:{s}" for t, s in table_rows()])
def test_reproduction_specs_name_methods_not_hyperparameters(table: str, spec: str) -> None:
    _, *variant = spec.split()
    assert set(variant) <= VARIANT_SWITCHES, f"{spec!r}: hyperparameters belong in conf/experiment_method/"
    overrides = reproduce.TABLES[table][1]
    assert all(o.startswith(("experiment=", "dataset.scenario=")) for o in overrides), overrides


def test_er_takes_its_own_learning_rate_in_the_der_protocol() -> None:
    # the bug this fixes: experiment=der_split_mnist method=er trained ER at DER's lr 0.03
    assert compose_cfg("experiment=der_split_mnist", "method=er").optimizer.lr == 0.1
    assert compose_cfg("experiment=der_split_mnist", "method=der").optimizer.lr == 0.03
    assert compose_cfg("experiment=der_permuted_mnist", "method=er").optimizer.lr == 0.2


@pytest.mark.parametrize(("scenario", "lambda_"), [("task_il", 1e7), ("domain_il", 1e6), ("class_il", 1e8)])
def test_vdv_ewc_strength_follows_the_scenario(scenario: str, lambda_: float) -> None:
    cfg = compose_cfg("experiment=vdv_split_mnist", f"dataset.scenario={scenario}", "method=ewc")
    assert cfg.method.lambda_ == lambda_


def test_vdv_preset_keeps_one_adam_across_tasks() -> None:
    # van de Ven & Tolias's code resets Adam only on request (their `adam_reset`)
    cfg = compose_cfg("experiment=vdv_split_mnist", "method=naive")
    assert cfg.module.reset_optimizer is False and cfg.optimizer._target_ == ADAM


def test_pnn_brings_task_ids_in_the_agem_protocol() -> None:
    assert compose_cfg("experiment=agem_permuted_mnist", "method=pnn").dataset.scenario == "task_il"
    assert compose_cfg("experiment=agem_permuted_mnist", "method=agem").dataset.scenario == "domain_il"


def test_command_line_beats_the_preset() -> None:
    cfg = compose_cfg("experiment=der_split_mnist", "method=er", "optimizer.lr=0.05", "method.buffer_size=200")
    assert cfg.optimizer.lr == 0.05 and cfg.method.buffer_size == 200
    cfg = compose_cfg("experiment=vdv_split_mnist", "dataset.scenario=class_il", "method=ewc", "method.lambda_=3.0")
    assert cfg.method.lambda_ == 3.0


def test_the_method_values_can_be_dropped() -> None:
    cfg = compose_cfg("experiment=der_split_mnist", "method=er", "~experiment_method")
    assert cfg.optimizer.lr == 0.03, "the experiment's learning rate, without ER's"


def test_no_experiment_no_preset() -> None:
    cfg = compose_cfg("method=er")
    assert cfg.optimizer.lr == 0.1 and cfg.batch_size == 32, "the plain defaults: sgd.yaml and split_digits"


def test_a_method_combined_at_hybrid_keeps_its_defaults() -> None:
    # presets are chosen by the primary `method` only; `+method@hybrid.er=er` composes and takes er.yaml's values
    cfg = compose_cfg("experiment=der_split_mnist", "method=der", "+method@hybrid.er=er")
    assert cfg.optimizer.lr == 0.03 and cfg.method.alpha == 1.0
    assert cfg.hybrid.er._target_ == "cl_lightning.methods.er.ER"


def test_every_preset_file_belongs_to_an_experiment_and_a_method() -> None:
    experiments = {p.stem for p in (CONF / "experiment").glob("*.yaml")}
    methods = {p.stem for p in (CONF / "method").glob("*.yaml")}
    assert PRESET_FILES
    for preset in PRESET_FILES:
        assert preset.parent.name in experiments and preset.name in methods, preset


# files with a per-scenario table are resolved in every scenario, the others in their protocol's
PRESET_SCENARIOS = [
    (preset, scenario)
    for preset in PRESET_FILES
    for scenario in (SCENARIOS if "cl.case" in (CONF / "experiment_method" / f"{preset}.yaml").read_text() else [None])
]


@pytest.mark.parametrize(("preset", "scenario"), PRESET_SCENARIOS, ids=[f"{p}:{s}" for p, s in PRESET_SCENARIOS])
def test_every_preset_resolves_in_every_scenario(preset: Path, scenario: str | None) -> None:
    cfg = compose_cfg(
        f"experiment={preset.parent}", f"method={preset.name}", "paths.output_dir=unused",  # Hydra's at run time
        *([f"dataset.scenario={scenario}"] if scenario else []),
    )  # fmt: skip
    resolved = OmegaConf.to_container(cfg, resolve=True)  # every cl.case table covers the scenario
    assert isinstance(resolved, dict) and resolved["optimizer"]["lr"] > 0


# ---------------------------------------------------------------------------------------------------- backbones
@pytest.mark.parametrize("dataset", ["split_cifar", "split_cifar10", "split_cifar100"])
def test_cifar_datasets_bring_mammoths_resnet18(dataset: str) -> None:
    cfg = compose_cfg("method=der", f"dataset={dataset}")
    assert cfg.model._target_ == RESNET and cfg.model.nf == 64


@pytest.mark.parametrize("dataset", ["split_mnist", "permuted_mnist", "rotated_mnist", "split_fmnist", "split_digits"])
def test_mnist_family_brings_an_mlp(dataset: str) -> None:
    assert compose_cfg(f"dataset={dataset}").model._target_ == MLP


@pytest.mark.parametrize("order", ["before", "after"])
def test_a_typed_model_beats_the_datasets(order: str) -> None:
    overrides = ["model=mlp", "dataset=split_cifar"]
    cfg = compose_cfg(*(overrides if order == "before" else overrides[::-1]))
    assert cfg.model._target_ == MLP


def test_a_method_that_brings_its_network_beats_the_datasets() -> None:
    assert compose_cfg("dataset=split_cifar", "method=pnn").model._target_ == PNN_MLP


@pytest.mark.parametrize(
    ("method", "extra"), [("icarl", []), ("xder", []), ("bic", []), ("lucir", ["model=resnet18", "+model.head=cosine"])]
)
def test_new_cifar_presets_run_end_to_end_on_real_format_files(
    tmp_path: Path, monkeypatch, method: str, extra: list[str]
) -> None:
    """iCaRL's, X-DER's and BiC's Seq-CIFAR-10 presets, and LUCIR with the protocol's ResNet-18 given its cosine head,
    train and evaluate every task on small files of the real format."""
    from helpers.fake_cifar import write_cifar10

    write_cifar10(tmp_path / "data", monkeypatch, per_class=4)
    cfg = compose_cfg(
        "experiment=der_split_cifar10", f"method={method}", *extra, f"data_dir={tmp_path / 'data'}",
        "epochs_per_task=1", "model.nf=4", "method.buffer_size=20", "logger=none", "save_checkpoints=false",
        "trainer.enable_progress_bar=false", f"paths.output_dir={tmp_path / 'run'}",
    )  # fmt: skip
    results = train(cfg)
    assert results["complete"] and results["method"] == method and len(results["acc_matrix"]) == 5
    assert all(math.isfinite(a) for row in results["acc_matrix"] for a in row)


def test_der_split_cifar10_runs_end_to_end_on_real_format_files(tmp_path: Path, monkeypatch) -> None:
    """The Seq-CIFAR-10 preset as users type it, on small files of the real format, shrunk by overrides."""
    from helpers.fake_cifar import write_cifar10

    write_cifar10(tmp_path / "data", monkeypatch, per_class=4)
    cfg = compose_cfg(
        "experiment=der_split_cifar10", "method=der", f"data_dir={tmp_path / 'data'}", "epochs_per_task=1",
        "model.nf=4", "logger=none", "save_checkpoints=false", "trainer.enable_progress_bar=false",
        f"paths.output_dir={tmp_path / 'run'}",
    )  # fmt: skip
    results = train(cfg)
    assert results["dataset"] == "split_cifar10" and results["complete"] and len(results["acc_matrix"]) == 5
    config = results["config"]
    assert config["model"]["_target_"] == RESNET and config["optimizer"]["lr"] == 0.03
    assert config["method"]["alpha"] == 0.3 and config["method"]["replay_batch_size"] == 32
    assert config["module"]["train_outputs"] == "all" and config["dataset"]["augment"] == "crop_flip"
