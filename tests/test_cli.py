import pytest
import yaml

from fedilora.cli import main

DEMO = "configs/demo.yaml"


def _run(capsys, *args):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", DEMO, *args])
    out = capsys.readouterr()
    return exit_info.value.code, out.out, out.err


def test_print_config_resolves_overrides(capsys):
    code, out, _ = _run(capsys, "--trainer.rounds", "3", "--data.missing_rate", "0.7", "--print_config")
    assert code == 0
    config = yaml.safe_load(out)
    assert config["trainer"]["rounds"] == 3
    assert config["data"]["missing_rate"] == 0.7
    assert config["trainer"]["ranks"] == [32, 32, 16, 16, 8, 8, 4, 4, 4, 4]
    assert config["trainer"]["callbacks"][0]["class_path"] == "fedilora.editing.ModelEditing"
    assert config["model"]["model_name"] == "fedilora-tiny"


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--trainer.rounds", "--trainer.clients_per_round", "--trainer.ranks", "--trainer.aggregator",
                   "--trainer.callbacks", "--model.lora_targets", "--model.lora_scale", "--model.missing_strategy",
                   "--data.missing_rate", "--data.missing_kind", "--data.partition", "--data.num_clients"):  # fmt: skip
        assert option in text
    assert "Clients sampled per round" in text  # docstrings become the help text


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--trainer.ranks", "[32, 16]"], "trainer.ranks: 2 ranks given but data.num_clients is 10"),
        (["--trainer.ranks", "[32,32,16,16,8,8,4,4,4,0]"], "trainer.ranks: every LoRA rank must be a positive"),
        (["--data.missing_rate", "1.5"], "data.missing_rate: 1.5 is outside [0, 1]"),
        (["--trainer.clients_per_round", "11"], "trainer.clients_per_round: 11 is more than data.num_clients"),
        (["--trainer.clients_per_round", "1.5"], "trainer.clients_per_round: a fraction must be in (0, 1]"),
        (["--trainer.aggregator", "NoSuchStrategy"], 'Parser key "trainer.aggregator"'),
        (["--trainer.rounds", "many"], 'Parser key "trainer.rounds"'),
        (["--model.lora_targets", "[out_proj]"], "model.lora_targets: unknown target 'out_proj'"),
        (["--data.missing_kind", "audio"], 'Parser key "data.missing_kind"'),
    ],
)
def test_bad_input_is_one_clear_message(capsys, tmp_path, args, expected):
    code, _, err = _run(capsys, "--trainer.root_dir", str(tmp_path), *args)
    assert code == 2
    assert expected in err
    assert "Traceback" not in err


def test_unknown_aggregator_lists_the_known_ones(capsys):
    _, _, err = _run(capsys, "--trainer.aggregator", "NoSuchStrategy")
    assert "known aggregator: DimensionWise, FedAvg" in err


def test_unknown_edit_key_names_the_option_and_choices(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "trainer:\n  callbacks:\n    - class_path: fedilora.editing.ModelEditing\n"
        "      init_args:\n        keys: lora_C\n"
    )
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", DEMO, "--config", str(bad)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert 'Parser key "keys"' in err and "'lora_A', 'lora_B', 'all'" in err and "lora_C" in err


def test_missing_config_file(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "configs/no_such.yaml"])
    assert exit_info.value.code == 2
    assert "no_such.yaml" in capsys.readouterr().err
