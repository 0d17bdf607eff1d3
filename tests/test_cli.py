import pickle
import shutil

import pytest
import torch
import yaml

import fedilora
from fedilora.checkpoint import digest
from fedilora.cli import EXTERNAL, FediLoRACLI, main
from fedilora.errors import ConfigError

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
    assert config["trainer"]["callbacks"][0]["class_path"] == "fedilora.algorithms.ModelEditing"
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
    (["--trainer.update_norm_factor", "1"], "trainer.update_norm_factor: must be > 1 or null (off)"),
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


@pytest.mark.parametrize(
    ("files", "args", "where"),
    [
        ({"bad.yaml": "trainer:\n  rounds: 3\n  ranks: [1, 2\nmodel:\n  lr: 1\n"}, ["--config", "bad.yaml"],
         "bad.yaml, line 4, column 6: invalid YAML: did not find expected ',' or ']' (while parsing a flow sequence "
         "at line 3, column 10)"),
        ({"outer.yaml": "model: inner.yaml\n", "inner.yaml": "lr: 0.1\n  weight_decay: 0\n"},
         ["--config", "outer.yaml"], "inner.yaml, line 2, column 15: invalid YAML: mapping values are not allowed"),
        ({"model.yaml": "lr: [1\n"}, ["--model", "model.yaml"], "model.yaml, line 2, column 1: invalid YAML: "),
    ],
    ids=["config", "nested", "group"],
)  # fmt: skip
def test_malformed_yaml_is_one_line_naming_the_file_line_and_column(capsys, tmp_path, files, args, where):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    args = [str(tmp_path / a) if a in files else a for a in args]
    code, _, err = _run(capsys, *args)
    lines = err.strip().splitlines()
    assert code == 2
    assert len(lines) == 1, err  # no usage
    assert lines[0].startswith(f"fedilora: error: {tmp_path}/{where}"), err


SMALL = ["--trainer.rounds", "1", "--trainer.max_local_steps", "1", "--trainer.progress", "false",
         "--data.dataset.init_args.num_train", "200", "--data.dataset.init_args.num_test", "60"]  # fmt: skip


@pytest.fixture(scope="module")
def cli_checkpoint(tmp_path_factory):
    """A checkpoint written by ``fedilora fit`` (1 round of the demo config on 200 samples)."""
    root = tmp_path_factory.mktemp("cli_runs")
    main(["fit", "--config", DEMO, *SMALL, "--trainer.root_dir", str(root)])
    path = root / "demo" / "version_0" / "checkpoints" / "round-0001.ckpt"
    assert path.is_file()
    return root, path


class Evil:
    """A pickle that would create ``marker`` when unpickled (``open(marker, "w")``)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def _flip(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 0xFF]) + data[index + 1 :]


DAMAGED = {
    "truncated": lambda data, marker, path: path.write_bytes(data[: len(data) // 2]),
    "empty": lambda data, marker, path: path.write_bytes(b""),
    "pickle byte flipped": lambda data, marker, path: path.write_bytes(_flip(data, data.index(b"data.pkl") + 60)),
    "zip directory byte flipped": lambda data, marker, path: path.write_bytes(
        _flip(data, data.rindex(b"PK\x01\x02") + 46)  # the first letter of a name in the central directory
    ),
    "text file": lambda data, marker, path: path.write_text("global_lora: 1\n"),
    "malicious pickle in a zip": lambda data, marker, path: torch.save({"format": "x", "x": Evil(marker)}, path),
    "malicious raw pickle": lambda data, marker, path: path.write_bytes(pickle.dumps(Evil(marker))),
}


@pytest.mark.parametrize("damage", DAMAGED)
def test_a_damaged_or_hostile_checkpoint_by_path_is_one_line(capsys, tmp_path, cli_checkpoint, damage):
    root, good = cli_checkpoint
    marker, path = tmp_path / "pwned", tmp_path / "round-0001.ckpt"
    DAMAGED[damage](good.read_bytes(), marker, path)
    code, _, err = _run(capsys, *SMALL, "--trainer.root_dir", str(root), "--ckpt_path", str(path))
    assert code == 2
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("fedilora: error:")]
    assert line.startswith(f"fedilora: error: --ckpt_path: {path} is ")
    assert not marker.exists()  # nothing in the file ran


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--model.lr", "0.003"], "model.lr: checkpoint 0.002, config 0.003"),
        (["--data.missing_rate", "0.5"], "data.missing_rate: checkpoint 0.4, config 0.5"),
        (["--trainer.seed", "1"], "trainer.seed: checkpoint 0, config 1"),
    ],
)
def test_a_resume_with_another_config_names_the_key(capsys, cli_checkpoint, args, expected):
    root, path = cli_checkpoint
    code, _, err = _run(capsys, *SMALL, "--trainer.root_dir", str(root), "--ckpt_path", "last", *args)
    assert code == 2 and f"--ckpt_path: {path} was written by a different configuration ({expected})" in err


def test_hyper_parameters_in_a_checkpoint_do_not_change_the_config(capsys, tmp_path, cli_checkpoint):
    _, good = cli_checkpoint
    path = tmp_path / "round-0001.ckpt"
    content = torch.load(good, weights_only=True)
    content.pop("digest")
    content["hyper_parameters"] = {"lr": 7.5}  # what LightningCLI merges into the config of a Lightning checkpoint
    content["digest"] = digest(content)
    torch.save(content, path)
    main(["fit", "--config", DEMO, *SMALL, "--trainer.root_dir", str(tmp_path), "--ckpt_path", str(path)])
    assert "resumed from" in capsys.readouterr().out
    config = yaml.safe_load((tmp_path / "demo" / "version_0" / "config.yaml").read_text())
    assert config["model"]["lr"] == 0.002  # configs/common/model.yaml's


def test_export_has_an_overwrite_option(capsys):
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    assert "--overwrite" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("init_args", "expected"),
    [("criterion: zscore", ["Parser key \"criterion\"", "'threshold', 'outlier'", "zscore"]),
     ("z_threshold: -1.0", ["fedilora: error: ModelEditing.z_threshold: must be >= 0"]),
     ("num_edits: -1", ["fedilora: error: ModelEditing.num_edits: must be >= 0"])],
)  # fmt: skip
def test_bad_editing_criterion_is_one_clear_message(capsys, tmp_path, init_args, expected):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "trainer:\n  callbacks:\n    - class_path: fedilora.editing.ModelEditing\n"
        f"      init_args:\n        {init_args}\n"
    )
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", DEMO, "--config", str(bad), "--trainer.root_dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert all(part in err for part in expected), err[-2000:]
    assert "Traceback" not in err


@pytest.mark.parametrize("name", ["../../x", "a/../../../x", "/tmp/elsewhere", "..", ""])
def test_a_run_name_cannot_leave_root_dir(capsys, tmp_path, name):
    root = tmp_path / "a" / "b"
    code, _, err = _run(capsys, "--trainer.root_dir", str(root), "--trainer.name", name)
    assert code == 2 and "Traceback" not in err
    assert f"trainer.name: a run name is one folder name inside trainer.root_dir (no '/', '\\' or '..'), got {name!r}" \
        in err
    assert list(tmp_path.rglob("*")) == []  # no folder made anywhere, inside root_dir or out of it


@pytest.mark.parametrize("seed", ["-5", "12345678901234567890", "4294967296"])
def test_a_seed_out_of_range_is_one_line_naming_the_range(capsys, tmp_path, seed):
    code, _, err = _run(capsys, "--trainer.root_dir", str(tmp_path), "--trainer.seed", seed)
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert f"trainer.seed: must be an integer in [0, 4294967295] (what Lightning's seed_everything accepts), " \
           f"got {seed}" in err


@pytest.mark.parametrize(
    ("option", "value", "expected"),
    [
        ("model.lr", ".nan", "model.lr: must be a finite number, got nan"),
        ("model.lr", ".inf", "model.lr: must be a finite number, got inf"),
        ("model.weight_decay", ".nan", "model.weight_decay: must be a finite number, got nan"),
        ("model.weight_decay", "-0.1", "model.weight_decay: must be >= 0, got -0.1"),
        ("model.lora_scale", ".inf", "model.lora_scale: must be a finite number, got inf"),
        ("model.lora_alpha", ".nan", "model.lora_alpha: must be a finite number, got nan"),
    ],
)
def test_non_finite_model_floats_are_refused_naming_the_key(capsys, tmp_path, option, value, expected):
    code, _, err = _run(capsys, "--trainer.root_dir", str(tmp_path), f"--{option}", value)
    assert code == 2 and expected in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())  # refused before a run folder exists


# ---------------------------------------------------------------------- conventions of argparse users
def _main(capsys, *args):
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    out = capsys.readouterr()
    return exit_info.value.code, out.out, out.err


def test_help_describes_fedilora_and_lists_every_subcommand(capsys):
    code, out, _ = _main(capsys, "--help")
    assert code == 0
    assert "Lightning Trainer command line tool" not in out and out.count("fedilora: federated LoRA") == 1
    listed = out[out.index("Available subcommands") :]
    for subcommand in ("fit", "export", "validate", *EXTERNAL):
        assert f"\n    {subcommand} " in listed, subcommand
    assert "compare" in EXTERNAL


def test_version(capsys):
    code, out, _ = _main(capsys, "--version")
    assert code == 0 and out.startswith(f"fedilora {fedilora.__version__} (lightning ")


def test_external_subcommand_is_not_run_as_a_lightning_subcommand():
    with pytest.raises(ConfigError, match=r"compare: run it with fedilora\.cli\.main"):
        FediLoRACLI(args=["compare"])


UNKNOWN = [
    # a prefix is not expanded (argparse's allow_abbrev): `round` must not run as `rounds`
    (["--trainer.round", "3"], "unknown option --trainer.round (did you mean --trainer.rounds?)", "fit"),
    (["--trainer.roundz=3"], "unknown option --trainer.roundz (did you mean --trainer.rounds?)", "fit"),
    (["--data.missing_rat", "0.1"], "unknown option --data.missing_rat (did you mean --data.missing_rate?)", "fit"),
    (
        ["--data.dataset.init_args.num_trainz", "3"],
        "unknown key data.dataset.init_args.num_trainz: fedilora.data.SyntheticBenchmark has no parameter "
        "'num_trainz' (did you mean data.dataset.init_args.num_train?)",
        None,
    ),
    (["--nothing_like_it", "1"], "unknown option --nothing_like_it; every option is listed by", "fit"),
]


@pytest.mark.parametrize(("args", "expected", "help_of"), UNKNOWN, ids=[a[0] for a, _, _ in UNKNOWN])
def test_an_unknown_option_is_one_line_with_the_closest_name(capsys, args, expected, help_of):
    code, _, err = _run(capsys, *args, "--print_config")
    assert code == 2
    assert err.strip().splitlines() == [err.strip()]  # one line, no usage
    assert expected in err
    if help_of:
        assert err.strip().endswith(f"every option is listed by: fedilora {help_of} --help")


@pytest.mark.parametrize("before", [[], ["--config", DEMO]], ids=["alone", "after the demo config"])
def test_an_unknown_key_in_a_config_file_is_one_line(capsys, tmp_path, before):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer:\n  roundz: 3\n")
    code, _, err = _main(capsys, "validate", *before, "--config", str(bad))
    assert code == 2 and err.strip().splitlines() == [err.strip()]
    assert "unknown key trainer.roundz (did you mean trainer.rounds?)" in err


def test_an_unknown_subcommand_is_one_line(capsys):
    code, _, err = _main(capsys, "fitt")
    assert code == 2
    assert err.strip() == "fedilora: error: unknown subcommand 'fitt' (did you mean fit?); choose from " + ", ".join(
        ["fit", "export", "validate", *EXTERNAL]
    )


def test_last_is_the_newest_checkpoint_of_the_run_whose_config_is_given(capsys, tmp_path, cli_checkpoint):
    _, good = cli_checkpoint
    run = tmp_path / "demo" / "version_0"
    shutil.copytree(good.parent.parent, run)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["trainer"]["root_dir"] = str(tmp_path)  # as if the run had been written here
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    # a later run of the same name, with more rounds: `last` of root_dir/name; damaged, so using it fails
    later = tmp_path / "demo" / "version_1" / "checkpoints" / "round-0009.ckpt"
    later.parent.mkdir(parents=True)
    later.write_bytes(_flip(good.read_bytes(), good.read_bytes().index(b"data.pkl") + 60))
    main(["validate", "--config", str(run / "config.yaml"), "--ckpt_path", "last"])
    out = capsys.readouterr().out
    expected = run / "checkpoints" / "round-0001.ckpt"
    assert f"checkpoint: {expected}\n" in out
    assert out.index(f"checkpoint: {expected}") < out.index("| evaluation")  # named before evaluating
    assert f"evaluated: {expected}" in out
    # with another config, `last` keeps its meaning: the newest run of root_dir/name
    code, out, err = _main(capsys, "validate", "--config", DEMO, *SMALL[:-4], "--trainer.root_dir", str(tmp_path),
                           "--ckpt_path", "last")  # fmt: skip
    assert code == 2 and f"--ckpt_path: {later} is " in err  # version_1: damaged, refused
