"""Export: adapters in peft's format load back with peft's own functions and reproduce the client."""

import json

import pytest
import torch
from safetensors.torch import load_file

from fedilora.backbone import build_clip
from fedilora.editing import ModelEditing
from fedilora.errors import ConfigError
from fedilora.export import MANIFEST, load_adapter, load_classifier, load_head
from fedilora.model import LoRACLIPClassifier
from fedilora.trainer import FederatedTrainer
from helpers import tiny_datamodule


def _trainer(root, seed=0):
    return FederatedTrainer(rounds=2, clients_per_round=2, ranks=[4, 2, 2], max_local_steps=2, checkpoint_every=1,
                            callbacks=[ModelEditing()], root_dir=str(root), progress=False, seed=seed)  # fmt: skip


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 2-round run with seed 3 (not torch's default state) and its export."""
    root = tmp_path_factory.mktemp("export")
    trained = _trainer(root, seed=3)
    model = LoRACLIPClassifier(num_classes=12, head_dropout=0.0)
    trained.fit(model, tiny_datamodule(num_clients=3))
    out = _export(root, root / "export")
    states = {"global": (4, trained.global_lora, trained.global_extra)}
    states.update({f"clients/client_{c}": s for c, s in trained.personal.items()})
    assert len(states) >= 3
    datamodule = tiny_datamodule(num_clients=3, missing_rate=0.5)
    datamodule.setup()
    batch = next(iter(datamodule.client_dataloader(0, "train", torch.Generator().manual_seed(0))))
    return root, trained, model, out, states, batch


def _expected(model, state, batch):
    model.load_client_state(*state)
    model.eval()
    with torch.no_grad():
        return model(batch)


def test_exported_adapters_reproduce_the_trained_models(run):
    _, trained, model, out, states, batch = run
    for folder, (rank, lora, extra) in states.items():
        directory = out / folder
        config = json.loads((directory / "adapter_config.json").read_text())
        assert config["r"] == rank and config["peft_type"] == "LORA"
        keys = load_file(str(directory / "adapter_model.safetensors")).keys()
        assert "base_model.model.visual.transformer.resblocks.0.attn.lora_A.weight" in keys
        assert json.loads((directory / "fedilora.json").read_text())["rank"] == rank

        expected = _expected(model, (rank, lora, extra), batch)
        torch.manual_seed(trained.seed)  # the same random backbone the run started from (pretrained: null)
        fresh = LoRACLIPClassifier(num_classes=12, head_dropout=0.0)
        fresh.configure_model()
        torch.manual_seed(trained.seed)
        fresh.backbone = load_adapter(build_clip("fedilora-tiny", None), directory)
        fresh.load_extra_state(load_head(directory))
        fresh.eval()
        with torch.no_grad():
            torch.testing.assert_close(fresh(batch), expected, rtol=1e-5, atol=1e-5)


def test_load_classifier_rebuilds_the_random_backbone_without_the_user_seeding_torch(run):
    _, _, model, out, states, batch = run
    for folder, state in states.items():
        meta = json.loads((out / folder / "fedilora.json").read_text())
        assert meta["backbone_seed"] == 3 and meta["pretrained"] is None
        expected = _expected(model, state, batch)
        torch.manual_seed(12345)  # whatever state the caller's RNG is in
        before = torch.get_rng_state()
        loaded = load_classifier(out / folder)
        assert torch.equal(torch.get_rng_state(), before)  # the caller's random state is left alone
        with torch.no_grad():
            torch.testing.assert_close(loaded(batch), expected, rtol=1e-5, atol=1e-5)
    # the seed matters: a backbone built from another seed computes something else
    torch.manual_seed(0)
    other = LoRACLIPClassifier(num_classes=12, head_dropout=0.0)
    other.configure_model()
    other.backbone = load_adapter(other.backbone, out / "global")
    other.load_extra_state(load_head(out / "global"))
    with torch.no_grad():
        assert not torch.allclose(other.eval()(batch), _expected(model, states["global"], batch), atol=1e-3)


def _export(root, out, overwrite=False):
    trainer = _trainer(root, seed=3)
    return trainer.export(LoRACLIPClassifier(num_classes=12, head_dropout=0.0), tiny_datamodule(num_clients=3),
                          ckpt_path="last", out=str(out), overwrite=overwrite)  # fmt: skip


def test_export_never_deletes_files_it_did_not_write(run):
    root, *_ = run
    out = root / "user_folder"
    (out / "global").mkdir(parents=True)
    notes, mine = out / "global" / "notes.txt", out / "mine.txt"
    notes.write_text("my notes")
    mine.write_text("mine")
    with pytest.raises(ConfigError, match=r"--out: .*user_folder is not empty; .*--overwrite"):
        _export(root, out)
    assert notes.read_text() == "my notes" and mine.read_text() == "mine"

    # --overwrite writes beside the user's files, and a later --overwrite replaces only what export wrote
    _export(root, out, overwrite=True)
    manifest = json.loads((out / MANIFEST).read_text())
    assert "global/adapter_model.safetensors" in manifest["files"] and "global/notes.txt" not in manifest["files"]
    stale = out / "clients" / "client_9"  # as if an earlier export had a client this run does not have
    stale.mkdir(parents=True)
    (stale / "head.safetensors").write_bytes(b"old")
    manifest["files"].append("clients/client_9/head.safetensors")
    (out / MANIFEST).write_text(json.dumps(manifest))
    (out / "global" / "head.safetensors").write_bytes(b"old export")
    _export(root, out, overwrite=True)
    assert notes.read_text() == "my notes" and mine.read_text() == "mine"
    assert not stale.exists()
    assert set(load_file(str(out / "global" / "head.safetensors"))) >= {"head.0.weight"}

    # a user's file where export would write is refused, not replaced, even with --overwrite
    clash = root / "clash"
    (clash / "global").mkdir(parents=True)
    (clash / "global" / "head.safetensors").write_text("the user's")
    with pytest.raises(ConfigError, match=r"clash/global/head\.safetensors exists and was not written by fedilora"):
        _export(root, clash, overwrite=True)
    assert (clash / "global" / "head.safetensors").read_text() == "the user's"

    # a manifest naming anything but export's own files cannot make --overwrite delete it
    (out / MANIFEST).write_text(json.dumps({"format": "fedilora-export-v1", "files": ["../mine.txt"]}))
    with pytest.raises(ConfigError, match="is not a manifest written by fedilora export"):
        _export(root, out, overwrite=True)
    assert mine.read_text() == "mine"
