"""The algorithms package: one module per method on a declared base, old class paths kept as aliases."""

from __future__ import annotations

import ast
import re
import warnings
from pathlib import Path

import pytest
import torch
from jsonargparse import ArgumentParser

import fedilora.algorithms as algorithms
from fedilora.algorithms.base import UNDECLARED, Aggregator, DimensionAccumulator, average_sums
from fedilora.callbacks import FederatedCallback, hook_caller
from fedilora.errors import ConfigError
from fedilora.privacy import DifferentialPrivacy, SecureAggregation
from fedilora.types import ClientUpdate

SRC = Path(__file__).resolve().parents[1] / "src" / "fedilora"
OURS = ["DimensionWise", "DimensionWiseDelta", "FedAvg", "HetLoRA", "FLoRA", "FlexLoRA", "Local", "Centralized"]
# the refusals the privacy layer gave before the capabilities were declared on the methods (by name, then)
DP_REFUSED = {
    "HetLoRA": "it weights each update by its own ||B_k A_k||, a weight one client controls, so the "
    "sensitivity of the aggregate is unbounded",
    "FLoRA": "it stacks every client's factors into the global adapter, releasing each update as it is",
    "FlexLoRA": "its SVD re-factorisation needs every client's factors and is not a sum of clipped updates",
    "Local": "nothing is shared, so there is nothing to privatise",
    "Centralized": "it pools the raw data: there is no client update to privatise",
}
SECAGG_REFUSED = {
    "HetLoRA": "its fallback to uniform weights when every B A is zero needs to see each update",
    "FLoRA": "the server stacks each client's own factors, so it must see every update",
    "FlexLoRA": "the server re-factorises the stacked factors of every client, so it must see every update",
    "Local": "nothing is aggregated",
    "Centralized": "it pools the raw data instead of aggregating updates",
}


def _dp() -> DifferentialPrivacy:
    return DifferentialPrivacy(clip_norm=1.0, noise_multiplier=1.0)


def test_every_method_has_its_own_module_and_is_found_by_name() -> None:
    found = algorithms.methods()
    for name in OURS:
        assert found[name] is getattr(algorithms, name)
        assert found[name].__module__.count(".") == 2  # fedilora.algorithms.<one module>
    assert len({found[name].__module__ for name in OURS}) == len(OURS)
    assert algorithms.find("FLoRA") is found["FLoRA"]
    with pytest.raises(ConfigError, match=r"unknown method 'Nope'; known: .*DimensionWise"):
        algorithms.find("Nope")


@pytest.mark.parametrize("name", OURS)
def test_privacy_refuses_exactly_the_methods_that_declare_why(name: str) -> None:
    method = algorithms.find(name)()
    for setup, refused, option in (
        (lambda m: _dp().setup(m, 4, 2, 3), DP_REFUSED, "trainer.privacy"),
        (lambda m: SecureAggregation().setup(m, 2), SECAGG_REFUSED, "trainer.secure_aggregation"),
    ):
        for given in (method, name):  # the object, or its name (what tests and experiments pass)
            if name in refused:
                with pytest.raises(ConfigError) as err:
                    setup(given)
                assert str(err.value) == f"{option}: not available with {name}: {refused[name]}"
            else:
                setup(given)


def test_a_method_that_declares_nothing_gets_no_private_form() -> None:
    class Undeclared(Aggregator):
        accumulator = DimensionAccumulator

        def finish(self, acc):
            return average_sums(acc)

    with pytest.raises(ConfigError, match=re.escape(f"trainer.privacy: not available with Undeclared: {UNDECLARED}")):
        _dp().setup(Undeclared(), 4, 2, 3)
    with pytest.raises(ConfigError, match=r"trainer\.secure_aggregation: not available with Undeclared"):
        SecureAggregation().setup(Undeclared(), 2)


def test_the_declared_accumulator_is_what_begin_returns_and_the_defaults_are_stateless() -> None:
    lora = {"m.lora_A.weight": torch.ones(4, 3), "m.lora_B.weight": torch.ones(5, 4)}
    for name in OURS:
        method = algorithms.find(name)()
        if method.accumulator is not None:
            assert type(method.begin(lora)) is method.accumulator
    plain = algorithms.DimensionWise()
    assert plain.state_dict() == {} and plain.merged_modules() == [] and not plain.merges_into_base


def test_flora_declares_its_base_merge_and_names_the_merged_modules() -> None:
    flora = algorithms.FLoRA().setup(scale=1.0)
    assert flora.merges_into_base
    lora = {"m.lora_A.weight": torch.randn(2, 3), "m.lora_B.weight": torch.zeros(5, 2)}
    update = ClientUpdate(0, 2, 10, {"m.lora_A.weight": torch.randn(2, 3), "m.lora_B.weight": torch.randn(5, 2)}, {})
    flora.aggregate(lora, [update])
    assert flora.merged_modules() == ["m"]
    expected = update.lora["m.lora_B.weight"] @ update.lora["m.lora_A.weight"]
    torch.testing.assert_close(flora.last_delta["m"], expected)


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("fedilora.coverage.DimensionWiseDelta", algorithms.DimensionWiseDelta),
        ("fedilora.baselines.FLoRA", algorithms.FLoRA),
        ("fedilora.baselines.HetLoRA", algorithms.HetLoRA),
        ("fedilora.editing.ModelEditing", algorithms.ModelEditing),
    ],
)
def test_old_class_paths_resolve_with_a_deprecation_warning(old: str, new: type) -> None:
    import importlib

    module, name = old.rsplit(".", 1)
    with pytest.warns(DeprecationWarning, match=f"{old} moved to"):
        assert getattr(importlib.import_module(module), name) is new
    # and a config spelling the old class_path still builds the new class
    base = Aggregator if new is not algorithms.ModelEditing else FederatedCallback
    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--x", type=base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        built = parser.instantiate_classes(parser.parse_args([f"--x={{'class_path': '{old}'}}"]))
    assert type(built.x) is new


def test_the_aggregation_module_keeps_the_base_and_the_streaming_api_without_warning() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        from fedilora.aggregation import Aggregator as Base
        from fedilora.aggregation import ClientUpdate as Update
        from fedilora.aggregation import DimensionWise, FedAvg, WeightedSums, rank_axis, truncate  # noqa: F401
    assert Base is Aggregator and Update is ClientUpdate and DimensionWise is algorithms.DimensionWise


def test_callbacks_declare_every_hook_the_engines_fire() -> None:
    fired = set()
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
                name = getattr(node.func, "attr", getattr(node.func, "id", ""))
                if name in ("call", "_call") and str(node.args[0].value).startswith("on_"):
                    fired.add(node.args[0].value)
    assert fired, "no hook call found: the scan is broken"
    assert fired <= set(FederatedCallback.HOOKS), fired - set(FederatedCallback.HOOKS)
    for hook in FederatedCallback.HOOKS:
        assert callable(getattr(FederatedCallback, hook))

    seen = []

    class Counting(FederatedCallback):
        def on_round_start(self, trainer, round):
            seen.append(round)

    call = hook_caller([Counting(), FederatedCallback()])
    call("on_round_start", round=3)
    call("on_round_end", round=3, metrics={})  # declared on the base: a no-op, not an error
    assert seen == [3]
