"""A 1-round federated run on each dataset, through its config under configs/ (tiny model, fixture data)."""

from __future__ import annotations

import json
import logging
import re

import pytest
import yaml

from fedilora.cli import main
from test_datasets_fixtures import make_food101, make_hateful_memes, make_mmimdb, make_table

DATASETS = {
    # config: (fixture builder, the dataset option naming its files, headline metrics in order)
    "food101": (lambda p: make_food101(p, {"train": 8, "test": 3}), "root", ["acc", "f1_macro"]),
    "mmimdb": (make_mmimdb, "root", ["f1_micro", "f1_macro", "f1_samples"]),
    "hateful_memes": (
        lambda p: make_hateful_memes(p, {"train": 12, "dev_seen": 4, "test_seen": 6}),
        "root",
        ["auroc", "acc"],
    ),
    "table": (lambda p: make_table(p, "csv", "multiclass", n=24), "path", ["acc", "f1_macro"]),
}
TINY = ["--model.model_name", "fedilora-tiny", "--model.pretrained", "null", "--trainer.accelerator", "cpu",
        "--data.num_workers", "0", "--data.dataset.init_args.image_size", "32"]  # fmt: skip


@pytest.mark.filterwarnings("ignore:No (positive|negative) samples in targets")  # tiny client test splits
@pytest.mark.parametrize("name", list(DATASETS))
def test_one_federated_round_on_each_dataset(tmp_path, capsys, name):
    build, option, metrics = DATASETS[name]
    files = build(tmp_path / "data")
    extra = ["--data.dataset.init_args.image_column", "file", "--data.dataset.init_args.text_column", "caption",
             "--data.dataset.init_args.label_column", "tags"] if name == "table" else []  # fmt: skip
    main(["fit", "--config", f"configs/{name}.yaml", f"--data.dataset.init_args.{option}", str(files), *TINY, *extra,
          "--data.num_clients", "2", "--data.missing_rate", "0.5", "--data.test_fraction", "0.25",
          "--trainer.ranks", "[4, 2]", "--trainer.clients_per_round", "2", "--trainer.rounds", "1",
          "--trainer.max_local_steps", "2",
          "--trainer.root_dir", str(tmp_path / "runs"), "--trainer.progress", "false"])  # fmt: skip
    results = json.loads((tmp_path / "runs" / f"fedilora_{name}" / "version_0" / "results.json").read_text())
    assert list(results["global"]) == ["complete", "image_only", "text_only"]
    for values in results["global"].values():
        assert list(values)[: len(metrics)] == metrics
        assert all(0.0 <= v <= 1.0 for v in values.values())
    assert results["personalized_clients"] == 2
    assert f"| {metrics[0]}" in capsys.readouterr().out


@pytest.mark.parametrize("name", list(DATASETS))
def test_dataset_configs_plug_into_every_method_config(capsys, name):
    # configs/<dataset>.yaml is FediLoRA; the data group file combines with each baseline's config
    for method in ("fedilora", "fedavg", "hetlora", "flora", "flexlora", "local", "centralized"):
        with pytest.raises(SystemExit) as exit_info:
            main(["fit", "--config", f"configs/{method}.yaml", "--data", f"configs/datasets/{name}.yaml",
                  "--model", "configs/common/model_vit_b32.yaml", "--print_config"])  # fmt: skip
        assert exit_info.value.code == 0
        config = yaml.safe_load(capsys.readouterr().out)
        assert config["data"]["dataset"]["class_path"].startswith("fedilora.data.")
        assert config["model"]["model_name"] == "ViT-B-32"


def _table_run(tmp_path, *options):
    files = make_table(tmp_path / "data", "csv", "multiclass", n=24)
    return files, [
        "fit", "--config", "configs/table.yaml", "--data.dataset.init_args.path", str(files), *TINY,
        "--data.dataset.init_args.image_column", "file", "--data.dataset.init_args.text_column", "caption",
        "--data.dataset.init_args.label_column", "tags", "--data.num_clients", "2", "--data.missing_rate", "0",
        "--data.val_fraction", "0", "--data.test_fraction", "0", "--trainer.ranks", "[4, 2]",
        "--trainer.clients_per_round", "2", "--trainer.rounds", "1", "--trainer.max_local_steps", "1",
        "--trainer.root_dir", str(tmp_path / "runs"), "--trainer.progress", "false", *options,
    ]  # fmt: skip


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_an_image_failing_in_training_stops_the_run_with_file_and_line(tmp_path, capsys):
    files, args = _table_run(tmp_path)
    _truncate(files.parent / "pics" / "004.png")  # passes the default (header) check; fails to decode
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert re.search(r"fedilora: error: client \d's train split: .*data\.csv line 6: image file .*004\.png", err)


def test_skip_leaves_out_an_image_that_does_not_decode_and_trains(tmp_path, capsys, caplog):
    files, args = _table_run(tmp_path, "--data.dataset.init_args.on_bad_sample", "skip")
    _truncate(files.parent / "pics" / "004.png")
    with caplog.at_level(logging.WARNING, logger="fedilora.data"):
        main(args)
    out, err = capsys.readouterr()
    logged = [r.getMessage() for r in caplog.records if r.name == "fedilora.data"]
    assert len(logged) == 1 and "MultimodalTable train: skipped 1 bad sample(s), kept 18" in logged[0]
    assert "data.csv line 6: image file" in logged[0] and "004.png cannot be decoded" in logged[0]
    assert "left out of the aggregation" not in out + err
    results = json.loads((tmp_path / "runs" / "fedilora_table" / "version_0" / "results.json").read_text())
    assert results["rounds"] == 1 and results["global"]["complete"]["acc"] >= 0.0


def test_a_single_class_table_is_one_line_from_the_cli(tmp_path, capsys):
    files, args = _table_run(tmp_path)
    lines = files.read_text().splitlines()
    files.write_text("\n".join([lines[0], *(line.rsplit(",", 1)[0] + ",cat" for line in lines[1:])]) + "\n")
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert re.search(r"fedilora: error: .*data\.csv \(column 'tags'\): only one class \('cat'\) found", err)
