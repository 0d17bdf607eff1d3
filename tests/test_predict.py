"""`fedilora predict` and `fedilora.predict`: labels of image files and texts from an export equal the
model's own argmax on the same samples read through the data pipeline (validate's path)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import fedilora
from fedilora.cli import main
from fedilora.data import FederatedDataModule, MultimodalTable
from fedilora.editing import ModelEditing
from fedilora.model import LoRACLIPClassifier
from fedilora.trainer import FederatedTrainer
from test_datasets_fixtures import make_table
from test_export import nan_head, tamper_tensor_data


def _data(path) -> FederatedDataModule:
    # images decoded at 40 pixels, which the model resizes to its 32: predict must decode them at 40 too
    dataset = MultimodalTable(str(path), image_column="file", text_column="caption", label_column="tags", image_size=40)
    return FederatedDataModule(dataset=dataset, num_clients=2, val_fraction=0.0, batch_size=4)


def _trainer(root) -> FederatedTrainer:
    return FederatedTrainer(rounds=2, clients_per_round=2, ranks=[4, 2], max_local_steps=3, checkpoint_every=1,
                            callbacks=[ModelEditing()], root_dir=str(root), progress=False, seed=5)  # fmt: skip


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 2-round run on a user's CSV (classes bird, cat, dog) and its export."""
    root = tmp_path_factory.mktemp("predict")
    path = make_table(root / "data", n=30)
    trainer = _trainer(root)
    model = LoRACLIPClassifier(num_classes=3)
    trainer.fit(model, _data(path))
    out = root / "export"
    _trainer(root).export(LoRACLIPClassifier(num_classes=3), _data(path), ckpt_path="last", out=str(out))
    datamodule = _data(path)
    datamodule.setup("validate")
    return root, trainer, model, datamodule, out


def _argmax(model, trainer, datamodule, condition):
    """What validate computes: the global state on the global test set under ``condition``."""
    model.load_client_state(max(model.ranks), trainer.global_lora, trainer.global_extra)
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(batch) for batch in datamodule.global_test_dataloader(condition)])
    return logits.softmax(-1)


@pytest.mark.parametrize("condition", ["complete", "image_only", "text_only"])
def test_predict_equals_the_models_argmax_on_the_data_pipelines_samples(run, condition):
    _, trainer, model, datamodule, out = run
    expected = _argmax(model, trainer, datamodule, condition)
    classes = datamodule.dataset.classes
    assert classes == ["bird", "cat", "dog"]
    meta = json.loads((out / "global" / "fedilora.json").read_text())
    assert meta["id2label"] == {"0": "bird", "1": "cat", "2": "dog"} and meta["image_size"] == 40
    paths, texts = [str(p) for p in datamodule.test.images.paths], list(datamodule.test.texts)
    assert len(paths) == len(expected) >= 5
    predictions = fedilora.predict(
        out,  # the export root: its global model
        images=paths if condition != "text_only" else None,
        texts=texts if condition != "image_only" else None,
        batch_size=4,
    )
    assert [p.label for p in predictions] == [classes[i] for i in expected.argmax(-1)]
    got = torch.tensor([[p.probabilities[c] for c in classes] for p in predictions])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert [p.probability for p in predictions] == pytest.approx(expected.max(-1).values.tolist(), abs=1e-5)
    # the prediction depends on what is missing: the three conditions do not give one answer
    if condition == "image_only":
        complete = _argmax(model, trainer, datamodule, "complete")
        assert not torch.allclose(complete, expected, atol=1e-4)


def test_a_clients_folder_predicts_with_its_personalized_model(run):
    _, trainer, model, datamodule, out = run
    client = min(trainer.personal)
    rank, lora, extra = trainer.personal[client]
    model.load_client_state(rank, lora, extra)
    model.eval()
    paths, texts = [str(p) for p in datamodule.test.images.paths], list(datamodule.test.texts)
    with torch.no_grad():
        expected = torch.cat([model(b) for b in datamodule.global_test_dataloader("complete")]).softmax(-1)
    predictions = fedilora.predict(out / "clients" / f"client_{client}", images=paths, texts=texts)
    got = torch.tensor([[p.probabilities[c] for c in datamodule.dataset.classes] for p in predictions])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_the_command_prints_one_line_per_input(run, capsys):
    _, _, _, datamodule, out = run
    paths = [str(p) for p in datamodule.test.images.paths[:3]]
    main(["predict", str(out), "--image", *paths, "--text", "sample number 1", "", "sample number 7"])
    lines = capsys.readouterr().out.splitlines()
    expected = fedilora.predict(out, images=paths, texts=["sample number 1", None, "sample number 7"])
    assert lines == [str(p) for p in expected]
    assert lines[0].startswith(f'{paths[0]} + "sample number 1" -> ')
    assert lines[1].startswith(f"{paths[1]} -> ")  # "" left its text out
    label, probability = lines[0].split(" -> ")[1].rsplit(" (", 1)
    assert label in ("bird", "cat", "dog") and 0 < float(probability.rstrip(")")) <= 1

    main(["predict", str(out / "global"), "--text", "sample number 2", "--json"])
    record = json.loads(capsys.readouterr().out)
    assert record["image"] is None and record["text"] == "sample number 2"
    assert set(record["probabilities"]) == {"bird", "cat", "dog"}
    assert record["probability"] == pytest.approx(record["probabilities"][record["label"]])


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--image", "nowhere.png"], "fedilora predict: error: predict: image nowhere.png does not exist"),
        (["--image", "{data}", "--text", "a", "b"], "predict: 1 images and 2 texts; with both, the k-th image"),
        (["--image", "", "--text", ""], "predict: input 1 has neither an image nor a text"),
        ([], "predict: give images (--image FILE ...), texts (--text TEXT ...) or both"),
        (["--text", "x", "--export-is-missing"], None),
    ],
)
def test_bad_input_is_one_line_and_exit_2(run, capsys, arguments, message):
    root, *_, out = run
    arguments = [a.replace("{data}", str(root / "data" / "pics")) for a in arguments]
    with pytest.raises(SystemExit) as stopped:
        main(["predict", str(out), *arguments])
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip()
    if message is not None:
        assert message in err and len(err.splitlines()) == 1


def test_a_folder_that_is_no_export_is_refused(tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["predict", str(tmp_path), "--text", "x"])
    assert stopped.value.code == 2
    assert "is not an exported adapter" in capsys.readouterr().err


def test_an_altered_or_nan_export_is_refused_in_one_line(run, tmp_path, capsys):
    root, *_, out = run
    image = str(next((root / "data" / "pics").iterdir()))
    for damage in ("tamper", "nan"):
        copy = tmp_path / damage
        shutil.copytree(out, copy)
        if damage == "tamper":
            tamper_tensor_data(copy / "global" / "adapter_model.safetensors")
            expected = f"predict: {copy / 'global' / 'adapter_model.safetensors'} does not match its SHA-256 digest"
        else:
            nan_head(copy / "global")
            expected = f"predict: {copy / 'global' / 'head.safetensors'}: tensor head."
        with pytest.raises(SystemExit) as stopped:
            main(["predict", str(copy), "--image", image])
        err = capsys.readouterr().err
        assert stopped.value.code == 2 and err.startswith(f"fedilora predict: error: {expected}")
        assert len(err.splitlines()) == 1
