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


BAD_INPUT = [
    # wrong types
    (["--trainer.rounds", "many"], 'Parser key "trainer.rounds"'),
    (["--trainer.devices", "abc"], 'Parser key "trainer.devices"'),
    # out-of-range numbers
    (["--trainer.rounds", "0"], "trainer.rounds: must be >= 1"),
    (["--trainer.local_epochs", "-1"], "trainer.local_epochs: must be >= 1"),
    (["--trainer.eval_every", "0"], "trainer.eval_every: must be >= 1"),
    (["--trainer.max_local_steps", "0"], "trainer.max_local_steps: must be >= 1 or null"),
    (["--trainer.clients_per_round", "11"], "trainer.clients_per_round: 11 is more than data.num_clients"),
    (["--trainer.clients_per_round", "1.5"], "trainer.clients_per_round: a fraction must be in (0, 1]"),
    (["--trainer.min_clients_per_round", "5"], "trainer.min_clients_per_round: 5 is more than the 4 clients"),
    (["--trainer.max_update_norm", "-1"], "trainer.max_update_norm: must be > 0 or null"),
    (["--trainer.checkpoint_every", "0"], "trainer.checkpoint_every: must be >= 1 or null"),
    (["--trainer.keep_last", "0"], "trainer.keep_last: must be >= 1"),
    (["--trainer.global_lora_rank", "8"], "trainer.global_lora_rank: 8 is smaller than the largest client rank 32"),
    (["--model.lora_scale", "0"], "model.lora_scale and model.lora_alpha must be > 0"),
    (["--model.lora_dropout", "1.5"], "model.lora_dropout and model.head_dropout must be in [0, 1)"),
    (["--model.head_hidden", "0"], "model.head_hidden: must be >= 1"),
    (["--model.lr", "-0.1"], "model.lr: must be > 0"),
    (["--data.missing_rate", "1.5"], "data.missing_rate: 1.5 is outside [0, 1]"),
    (["--data.test_missing_rate", "2"], "data.test_missing_rate: 2.0 is outside [0, 1]"),
    (["--data.val_fraction", "0.9", "--data.test_fraction", "0.2"], "data.val_fraction and data.test_fraction"),
    (["--data.batch_size", "0"], "data.batch_size and data.eval_batch_size must be >= 1"),
    (["--data.partition", "dirichlet", "--data.dirichlet_alpha", "0"], "data.dirichlet_alpha: must be > 0"),
    (["--data.dataset.init_args.noise", "1.0"], "data.dataset.noise: must be in [0, 1)"),
    # ranks and clients
    (["--trainer.ranks", "[32, 16]"], "trainer.ranks: 2 ranks given but data.num_clients is 10"),
    (["--trainer.ranks", "[32,32,16,16,8,8,4,4,4,0]"], "trainer.ranks: every LoRA rank must be a positive"),
    (["--trainer.ranks", "128"], "trainer.ranks: rank 128 exceeds the dimensions of LoRA target"),
    (["--data.missing_rate", "[0.1,0.2]"], "data.missing_rate: 2 rates given for 10 clients"),
    (["--data.missing_kind", "[text,image]"], "data.missing_kind: 2 kinds given for 10 clients"),
    (["--trainer.ranks", "4", "--data.num_clients", "6000"], "data.num_clients: 6000 clients but the training pool"),
    (
        [
            "--trainer.ranks",
            "4",
            "--data.num_clients",
            "600",
            "--data.partition",
            "dirichlet",
            "--data.dirichlet_alpha",
            "0.01",
        ],
        "some client keeps getting fewer than 1 samples",
    ),
    # unknown names
    (["--trainer.aggregator", "NoSuchStrategy"], 'Parser key "trainer.aggregator"'),
    (["--trainer.callbacks", "[NoSuchCallback]"], 'Parser key "trainer.callbacks"'),
    (["--trainer.accelerator", "tpu"], "trainer.accelerator/devices/strategy/num_nodes/precision ('tpu'"),
    (["--trainer.strategy", "nope"], "You selected an invalid strategy name"),
    (["--trainer.precision", "7-bit"], "Precision '7-bit' is invalid"),
    (["--trainer.aggregator", "FedAvg"], "FedAvg needs every client to have the same rank"),
    (["--model.model_name", "ViT-Q-99"], "model.model_name: unknown open_clip model 'ViT-Q-99'"),
    (["--model.lora_targets", "[out_proj]"], "model.lora_targets: unknown target 'out_proj'"),
    (["--model.lora_towers", "[audio]"], "model.lora_towers: unknown tower 'audio'"),
    (["--model.missing_strategy", "mean"], 'Parser key "model.missing_strategy"'),
    (["--data.missing_kind", "audio"], 'Parser key "data.missing_kind"'),
    (["--data.missing_kind", "[text,audio]"], 'Parser key "data.missing_kind"'),
    (["--data.personal_test_missing", "mine"], 'Parser key "data.personal_test_missing"'),
    (["--data.partition", "random"], 'Parser key "data.partition"'),
    # files
    (["--model.pretrained", "/no/such/file.pt"], "model.pretrained: '/no/such/file.pt'"),
    (["--ckpt_path", "/no/such.ckpt"], "--ckpt_path: checkpoint /no/such.ckpt does not exist"),
    (["--ckpt_path", "last", "--trainer.name", "never_ran"], "--ckpt_path last: no checkpoint under"),
]


@pytest.mark.parametrize(("args", "expected"), BAD_INPUT, ids=[" ".join(a)[:60] for a, _ in BAD_INPUT])
def test_bad_input_is_one_clear_message(capsys, tmp_path, args, expected):
    code, _, err = _run(capsys, "--trainer.root_dir", str(tmp_path), *args)
    assert code == 2
    assert expected in err
    assert "Traceback" not in err


def test_unwritable_log_directory(capsys, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    code, _, err = _run(capsys, "--trainer.root_dir", str(blocker), "--data.dataset.init_args.num_train", "200")
    assert code == 2 and "trainer.root_dir: cannot write the run directory" in err and "Traceback" not in err


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
