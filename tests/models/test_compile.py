"""``compile``: the network compiled in place with ``torch.compile`` (every method: ``tests/test_contract.py``)."""

from __future__ import annotations

import pytest
import torch

from cl_lightning.build import compile_backend, compile_network
from cl_lightning.errors import ConfigError
from cl_lightning.train import train


@pytest.mark.parametrize(
    ("value", "backend"), [(False, None), (None, None), (True, "inductor"), ("aot_eager", "aot_eager")]
)
def test_compile_names_a_backend(value: object, backend: str | None) -> None:
    assert compile_backend(value) == backend


@pytest.mark.parametrize("value", ["fast", 1, "Inductor"])
def test_an_unknown_backend_is_refused_in_one_line_before_anything_runs(make_cfg, tmp_path, value: object) -> None:
    cfg = make_cfg("logger=none", f"compile={value}")
    with pytest.raises(
        ConfigError, match=rf"^compile={value!r}: choose true, false or a torch.compile backend \(.*inductor"
    ):
        train(cfg)
    assert not (tmp_path / "run0").exists(), "a refused command leaves no directory"


def test_compiled_in_place_keeps_the_network_its_names_and_its_teachers_apart() -> None:
    """``nn.Module.compile`` rather than ``torch.compile(net)``: same object, same state_dict keys; a deep copy (a
    teacher) computes with its own weights, not the student's."""
    import copy

    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    keys = list(net.state_dict())
    compile_network(net, "aot_eager")
    x = torch.randn(5, 4)
    before = net(x).detach()
    teacher = copy.deepcopy(net)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    assert list(net.state_dict()) == keys
    torch.testing.assert_close(teacher(x), before)
    assert not torch.allclose(net(x), before)


@pytest.mark.slow  # inductor's code generation: about 20 s on the CPU
def test_compile_true_trains_with_inductor_to_the_eager_result(make_cfg) -> None:
    eager = train(make_cfg("logger=none", "epochs_per_task=1", "max_tasks=2"))
    compiled = train(make_cfg("logger=none", "epochs_per_task=1", "max_tasks=2", "compile=true"))
    assert compiled["acc_matrix"] == eager["acc_matrix"]
    for p_c, p_e in zip(compiled.module.net.parameters(), eager.module.net.parameters(), strict=True):
        torch.testing.assert_close(p_c, p_e, rtol=1e-4, atol=1e-5)
