"""`fedilora validate`: a checkpoint or an exported adapter evaluated without training."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch

from fedilora.aggregation import FedAvg
from fedilora.checkpoint import digest
from fedilora.cli import main
from fedilora.data import FederatedDataModule, HuggingFaceDataset
from fedilora.editing import ModelEditing
from fedilora.errors import ConfigError
from fedilora.model import LoRACLIPClassifier
from fedilora.trainer import FederatedTrainer
from helpers import tiny_datamodule
from test_export import nan_head, tamper_tensor_data
from test_hf import saved


def _trainer(root, **kwargs) -> FederatedTrainer:
    options = dict(rounds=2, clients_per_round=2, ranks=[4, 2, 2], max_local_steps=2, checkpoint_every=1,
                   callbacks=[ModelEditing()], root_dir=str(root), progress=False)  # fmt: skip
    return FederatedTrainer(**{**options, **kwargs})


def _data(test_missing_rate: float = 0.3, **kwargs) -> FederatedDataModule:
    return tiny_datamodule(num_clients=3, num_train=240, num_test=60, test_missing_rate=test_missing_rate, **kwargs)


def _validate(root, data=None, model=None, trainer=None, **kwargs) -> dict:
    model = model or LoRACLIPClassifier(num_classes=12)
    return (trainer or _trainer(root)).validate(model, data or _data(), **kwargs)


def _part(metrics: dict, prefix: str) -> dict:
    return {k: v for k, v in metrics.items() if k.startswith(prefix)}


def _evaluated(metrics: dict) -> dict:
    return _part(metrics, "global/") | _part(metrics, "personalized/")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 2-round run of 3 clients (test missing rate 0.3: the `missing` condition is evaluated too), exported."""
    root = tmp_path_factory.mktemp("validate")
    trainer = _trainer(root)
    trainer.fit(LoRACLIPClassifier(num_classes=12), _data())
    _trainer(root).export(LoRACLIPClassifier(num_classes=12), _data(), ckpt_path="last", out=str(root / "export"))
    return root, trainer


def test_validate_a_checkpoint_gives_the_fit_runs_final_numbers(run):
    root, trained = run
    final = _evaluated(trained.history[-1])
    assert {"global/missing/acc", "personalized/mean/acc", "personalized/client_0/acc"} <= final.keys()
    checkpoints = root / "fedilora" / "version_0" / "checkpoints"
    for ckpt in ("last", str(checkpoints / "round-0002.ckpt")):
        results = _validate(root, ckpt_path=ckpt)
        assert results["metrics"] == final  # exactly: the same states, data, masks and evaluation
        assert results["rounds"] == 2 and results["source"].endswith("round-0002.ckpt")
    earlier = _validate(root, ckpt_path=str(checkpoints / "round-0001.ckpt"))  # the state after round 1
    assert earlier["metrics"] == _evaluated(trained.history[0])
    assert earlier["metrics"] != final


def test_validate_an_exported_adapter_gives_the_same_global_numbers(run):
    root, trained = run
    final = _evaluated(trained.history[-1])
    results = _validate(root, adapter=str(root / "export"))
    for prefix in ("global/", "personalized/"):
        assert _part(results["metrics"], prefix) == pytest.approx(_part(final, prefix), abs=1e-6)
    alone = _validate(root, adapter=str(root / "export" / "global"))  # the global folder: no personalized models
    assert _part(alone["metrics"], "global/") == pytest.approx(_part(final, "global/"), abs=1e-6)
    assert not _part(alone["metrics"], "personalized/")


def test_chosen_conditions_and_missing_rate(run):
    root, trained = run
    final = trained.history[-1]
    results = _validate(root, ckpt_path="last", conditions=["text_only", "missing"])
    assert list(results["global"]) == ["text_only", "missing"]
    assert results["global"]["text_only"]["acc"] == final["global/text_only/acc"]
    assert results["global"]["missing"]["acc"] == final["global/missing/acc"]
    # another test missing rate changes the `missing` figures, not the complete ones
    other = _validate(root, data=_data(test_missing_rate=0.9), ckpt_path="last", conditions=["complete", "missing"])
    assert other["global"]["complete"]["acc"] == final["global/complete/acc"]
    assert other["global"]["missing"]["acc"] != final["global/missing/acc"]
    with pytest.raises(ConfigError, match=r"--conditions missing: set --data\.test_missing_rate above 0"):
        _validate(root, data=_data(test_missing_rate=0.0), ckpt_path="last", conditions=["missing"])


def test_personalized_only_for_clients_whose_test_split_exists(run):
    root, trained = run
    results = _validate(root, data=_data(test_fraction=0.0), ckpt_path="last")
    assert results["personalized"] == {} and results["personalized_clients"] == 0
    assert results["global"]["complete"]["acc"] == trained.history[-1]["global/complete/acc"]


def test_bad_inputs_are_one_clear_error(run, tmp_path):
    root, _ = run
    with pytest.raises(ConfigError, match=r"--ckpt_path: checkpoint .*nope\.ckpt does not exist"):
        _validate(root, ckpt_path=str(tmp_path / "nope.ckpt"))
    with pytest.raises(ConfigError, match=r"--ckpt_path last: no checkpoint under"):
        _validate(root, trainer=_trainer(tmp_path), ckpt_path="last")
    with pytest.raises(ConfigError, match=r"give exactly one of --ckpt_path"):
        _validate(root)
    with pytest.raises(ConfigError, match=r"--adapter: .* is not an exported adapter"):
        _validate(root, adapter=str(tmp_path))
    with pytest.raises(
        ConfigError, match=r"written by a DimensionWise run, this config's trainer\.aggregator is FedAvg"
    ):
        _validate(root, trainer=_trainer(root, aggregator=FedAvg(), ranks=2), ckpt_path="last")
    # wrong data for the model: 3 classes against a head trained for 12
    three = FederatedDataModule(
        dataset=HuggingFaceDataset(str(saved(tmp_path / "three")), image_size=32), num_clients=3
    )
    for source in ({"ckpt_path": "last"}, {"adapter": str(root / "export")}):
        with pytest.raises(ConfigError, match=r"trained for 12 .*the data has 3 classes \(multiclass\)"):
            _validate(root, data=three, model=LoRACLIPClassifier(num_classes=3), **source)
    with pytest.raises(ConfigError, match=r"rank-4 LoRA tensors do not fit this model"):
        _validate(root, model=LoRACLIPClassifier(num_classes=12, lora_targets=["c_fc"]), ckpt_path="last")
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for name in ("adapter_config.json", "head.safetensors", "fedilora.json"):
        (damaged / name).write_bytes((root / "export" / "global" / name).read_bytes())
    (damaged / "adapter_model.safetensors").write_bytes(b"\x00" * 10)  # truncated
    with pytest.raises(ConfigError, match=r"--adapter: .*damaged/adapter_model\.safetensors does not match its SHA"):
        _validate(root, adapter=str(damaged))
    meta = json.loads((damaged / "fedilora.json").read_text())
    del meta["sha256"]  # as an export written before digests existed: the truncated file is still refused
    (damaged / "fedilora.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match=r"--adapter: .*damaged/adapter_model\.safetensors cannot be read"):
        _validate(root, adapter=str(damaged))


def test_an_export_altered_after_export_is_refused_naming_the_file(run, tmp_path):
    """400 bytes of tensor data changed: the file still parses, and gave other figures before digests."""
    root, _ = run
    copy = tmp_path / "export"
    shutil.copytree(root / "export", copy)
    tamper_tensor_data(copy / "global" / "adapter_model.safetensors")
    with pytest.raises(ConfigError) as refused:
        _validate(root, adapter=str(copy))
    assert str(refused.value).startswith(f"--adapter: {copy / 'global' / 'adapter_model.safetensors'} does not match")
    assert "altered or damaged after export" in str(refused.value) and "\n" not in str(refused.value)


def test_an_export_with_a_nan_head_is_refused_naming_the_file_and_tensor(run, tmp_path):
    root, _ = run
    copy = tmp_path / "export"
    shutil.copytree(root / "export", copy)
    nan_head(copy / "global")  # digests updated: as if the export had been written with this head
    with pytest.raises(ConfigError, match=r"^--adapter: .*global/head\.safetensors: tensor head\.\d\.\w+ has NaN"):
        _validate(root, adapter=str(copy))


def test_a_checkpoint_with_nan_in_its_global_state_is_refused_by_validate_export_and_resume(run, tmp_path):
    root, _ = run
    source = root / "fedilora" / "version_0" / "checkpoints" / "round-0002.ckpt"
    content = torch.load(source, weights_only=True)
    key = sorted(content["global_lora"])[0]
    content["global_lora"][key] = torch.full_like(content["global_lora"][key], float("nan"))
    del content["digest"]
    content["digest"] = digest(content)  # a consistent file: only the content check can refuse it
    bad = tmp_path / "fedilora" / "version_0" / "checkpoints" / "round-0002.ckpt"
    bad.parent.mkdir(parents=True)
    torch.save(content, bad)
    expected = rf"^--ckpt_path: {re.escape(str(bad))}: tensor global_lora\[{re.escape(key)}\] has NaN values"
    out = tmp_path / "x"
    with pytest.raises(ConfigError, match=expected):
        _validate(root, ckpt_path=str(bad))
    with pytest.raises(ConfigError, match=expected):
        _trainer(tmp_path).export(LoRACLIPClassifier(num_classes=12), _data(), ckpt_path="last", out=str(out))
    assert not out.exists()
    with pytest.raises(ConfigError, match=expected):  # resume
        _trainer(tmp_path, rounds=3).fit(LoRACLIPClassifier(num_classes=12), _data(), ckpt_path=str(bad))


def _cli(capsys, *args):
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    out = capsys.readouterr()
    return exit_info.value.code, out.out, out.err


def _rows(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("|")]


TINY_RUN = ["--trainer.rounds", "1", "--trainer.max_local_steps", "2", "--trainer.ranks", "[4, 2, 2]",
            "--trainer.clients_per_round", "2", "--data.num_clients", "3", "--data.dataset.init_args.num_train", "240",
            "--data.dataset.init_args.num_test", "60", "--trainer.progress", "false"]  # fmt: skip


@pytest.mark.slow
def test_cli_validate_prints_the_fit_table_and_refuses_bad_input(tmp_path, capsys):
    main(["fit", "--config", "configs/demo.yaml", *TINY_RUN, "--trainer.root_dir", str(tmp_path)])
    fit_out = capsys.readouterr().out
    run_dir = tmp_path / "demo" / "version_0"
    config = str(run_dir / "config.yaml")
    main(["validate", "--config", config, "--ckpt_path", "last", "--out", str(tmp_path / "v.json")])
    out = capsys.readouterr().out
    assert len(_rows(out)) == 6 and _rows(out) == _rows(fit_out)  # header, rule, 3 conditions, personalized
    assert "evaluated: " in out and "round-0001.ckpt (1 rounds trained)" in out
    written = json.loads((tmp_path / "v.json").read_text())
    fit_results = json.loads((run_dir / "results.json").read_text())
    assert written["global"] == fit_results["global"] and written["personalized"] == fit_results["personalized"]
    assert not (tmp_path / "demo" / "version_1").exists()  # validate starts no run directory of its own

    main(["export", "--config", config, "--ckpt_path", "last", "--out", str(tmp_path / "export")])
    capsys.readouterr()
    main(["validate", "--config", config, "--adapter", str(tmp_path / "export"), "--conditions", "[complete]"])
    out = capsys.readouterr().out
    assert len(_rows(out)) == 4 and _rows(out)[2] == _rows(fit_out)[2]  # global, complete, from the export

    missing = tmp_path / "missing.ckpt"
    code, _, err = _cli(capsys, "validate", "--config", config, "--ckpt_path", str(missing))
    assert code == 2 and err.strip() == f"fedilora: error: --ckpt_path: checkpoint {missing} does not exist"
    three = ["--data", "configs/datasets/hf.yaml", "--data.dataset.init_args.path", str(saved(tmp_path / "three"))]
    code, _, err = _cli(
        capsys, "validate", "--config", config, *three, "--data.num_clients", "3", "--ckpt_path", "last"
    )
    assert code == 2 and "Traceback" not in err
    assert "fedilora: error: --ckpt_path" in err and "trained for 12 outputs; the data has 3 classes" in err
