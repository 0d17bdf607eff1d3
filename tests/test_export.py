"""Export: adapters in peft's format load back with peft's own functions and reproduce the client."""

import hashlib
import json
import re
import shutil

import open_clip
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file

from fedilora.backbone import build_clip
from fedilora.editing import ModelEditing
from fedilora.errors import ConfigError
from fedilora.export import (
    ADAPTER_FILES,
    MANIFEST,
    export_adapters,
    file_sha256,
    load_adapter,
    load_classifier,
    load_head,
)
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
    manifest["files"]["clients/client_9/head.safetensors"] = None
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


# ---------------------------------------------------------------------------- digests, non-finite
def tamper_tensor_data(path, count=400):
    """Change ``count`` bytes of a safetensors file's tensor data (after its header): the file still parses."""
    data = bytearray(path.read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")
    assert len(data) - start > count
    data[start : start + count] = bytes((b + 1) % 256 for b in data[start : start + count])
    path.write_bytes(bytes(data))


def rewrite_with_digests(folder, name, tensors):
    """Replace ``folder/name`` and update its digests in fedilora.json and the manifest, as an export that
    wrote these tensors would have: only a content check can refuse it."""
    save_file(tensors, str(folder / name))
    meta = json.loads((folder / "fedilora.json").read_text())
    meta["sha256"][name] = file_sha256(folder / name)
    (folder / "fedilora.json").write_text(json.dumps(meta))
    root = next(p for p in folder.parents if (p / MANIFEST).is_file())
    manifest = json.loads((root / MANIFEST).read_text())
    for file in (name, "fedilora.json"):
        manifest["files"][(folder / file).relative_to(root).as_posix()] = file_sha256(folder / file)
    (root / MANIFEST).write_text(json.dumps(manifest))


def nan_head(folder):
    head = load_file(str(folder / "head.safetensors"))
    rewrite_with_digests(folder, "head.safetensors", {k: torch.full_like(v, float("nan")) for k, v in head.items()})


def test_the_manifest_and_each_folder_hold_every_files_sha256(run):
    _, _, _, out, states, _ = run
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["format"] == "fedilora-export-v2"
    assert set(manifest["files"]) == {f"{folder}/{name}" for folder in states for name in ADAPTER_FILES}
    for relative, digest in manifest["files"].items():
        assert digest == hashlib.sha256((out / relative).read_bytes()).hexdigest()
    meta = json.loads((out / "global" / "fedilora.json").read_text())
    assert meta["sha256"]["head.safetensors"] == manifest["files"]["global/head.safetensors"]
    assert meta["id2label"] is None and meta["base_weights_changed"] is False  # the synthetic set has no names


def test_an_altered_file_is_refused_by_every_loader_naming_it(run, tmp_path):
    _, _, _, out, _, _ = run
    for name in ("adapter_model.safetensors", "head.safetensors"):
        copy = tmp_path / name / "export"
        shutil.copytree(out, copy)
        tamper_tensor_data(copy / "global" / name)
        expected = rf"^{re.escape(str(copy / 'global' / name))} does not match its SHA-256 digest in .*: it was altered"
        for load in (load_classifier, load_head, lambda d: load_adapter(build_clip("fedilora-tiny", None), d)):
            with pytest.raises(ConfigError, match=expected) as refused:
                load(copy / "global")
            assert "\n" not in str(refused.value)
        # a folder copied on its own (no manifest above it) is checked against its fedilora.json
        alone = tmp_path / name / "alone"
        shutil.copytree(copy / "global", alone)
        with pytest.raises(ConfigError, match=rf"{name} does not match its SHA-256 digest in .*alone/fedilora\.json"):
            load_classifier(alone)


def test_a_nan_head_is_refused_naming_the_file_and_tensor(run, tmp_path):
    _, _, _, out, states, _ = run
    copy = tmp_path / "export"
    shutil.copytree(out, copy)
    client = next(folder for folder in states if folder.startswith("clients/"))
    nan_head(copy / client)
    expected = rf"{client}/head\.safetensors: tensor head\.\d\.(weight|bias) has NaN values; a model with non-finite"
    with pytest.raises(ConfigError, match=expected):
        load_classifier(copy / client)
    with pytest.raises(ConfigError, match=expected):
        load_head(copy / client)
    load_classifier(copy / "global")  # the other folders are intact


def test_an_export_without_digests_loads_with_a_note(run, tmp_path, caplog):
    """Exports written before digests existed (manifest v1, no sha256 in fedilora.json) stay loadable."""
    _, _, model, out, states, batch = run
    copy = tmp_path / "old"
    shutil.copytree(out, copy)
    manifest = json.loads((copy / MANIFEST).read_text())
    (copy / MANIFEST).write_text(json.dumps({"format": "fedilora-export-v1", "files": sorted(manifest["files"])}))
    meta = json.loads((copy / "global" / "fedilora.json").read_text())
    del meta["sha256"]
    (copy / "global" / "fedilora.json").write_text(json.dumps(meta))
    with caplog.at_level("WARNING", logger="fedilora"):
        loaded = load_classifier(copy / "global")
    assert "no content digests (exported by an earlier fedilora)" in caplog.text
    with torch.no_grad():
        torch.testing.assert_close(loaded(batch), _expected(model, states["global"], batch), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------- stock peft
def _stock_clip(meta):
    """What a user without fedilora's loader does: the run's backbone from its seed, then stock peft."""
    torch.manual_seed(meta["backbone_seed"])
    return open_clip.create_model(meta["model_name"], pretrained=meta["pretrained"])


def test_stock_peft_refuses_an_adapter_of_attention_layers_loudly(run):
    """Stock peft 0.21 adds MultiheadAttention's out_proj delta twice (huggingface/peft PR #3774): it must not
    load such an export silently into another model."""
    _, _, _, out, _, _ = run
    meta = json.loads((out / "global" / "fedilora.json").read_text())
    assert "attn" in meta["target_modules"]
    with pytest.raises(ValueError, match=r"fedilora\.export\.load_adapter") as refused:
        PeftModel.from_pretrained(_stock_clip(meta), str(out / "global"))
    assert "stock peft 0.21 computes differently" in str(refused.value)


def test_stock_peft_loads_an_adapter_without_attention_exactly(tmp_path):
    """Without attention targets, stock peft on a freshly built open_clip gives fedilora's model."""
    torch.manual_seed(7)
    model = LoRACLIPClassifier(num_classes=4, lora_targets=["c_fc", "c_proj"], lora_scale=2.0, head_dropout=0.0)
    model.configure_model()
    model.add_ranks([4, 2])
    generator = torch.Generator().manual_seed(0)
    states = {}
    for rank in (4, 2):  # non-zero B: an adapter that changes the model
        lora = {k: torch.randn(v.shape, generator=generator) * 0.2 for k, v in model.lora_state(rank).items()}
        states[rank] = (rank, lora, model.extra_state())
    export_adapters(model, tmp_path, states[4], {0: states[2]}, completed_rounds=1, backbone_seed=7,
                    classes=["a", "b", "c", "d"])  # fmt: skip
    images = torch.randn(3, 3, 32, 32, generator=generator)
    tokens = open_clip.get_tokenizer("fedilora-tiny")(["a red square", "two", ""])
    for folder in ("global", "clients/client_0"):
        meta = json.loads((tmp_path / folder / "fedilora.json").read_text())
        assert meta["id2label"] == {"0": "a", "1": "b", "2": "c", "3": "d"}
        stock = PeftModel.from_pretrained(_stock_clip(meta), str(tmp_path / folder)).eval()
        ours = load_classifier(tmp_path / folder)
        plain = _stock_clip(meta).eval()
        with torch.no_grad():
            for encode, x in (("encode_image", images), ("encode_text", tokens)):
                expected = getattr(ours.clip, encode)(x, normalize=True)
                torch.testing.assert_close(getattr(stock.get_base_model(), encode)(x, normalize=True), expected)
                assert (getattr(plain, encode)(x, normalize=True) - expected).abs().max() > 1e-3  # the adapter acts


# ----------------------------------------------------------------------------------------- --merged
def test_merged_export_loads_with_plain_open_clip_and_gives_validates_logits(run):
    """``export --merged``: open_clip's own folder layout, the LoRA merged in; plain open_clip plus the head
    computes the logits of the model validate evaluates, and so does the peft-format export beside it."""
    root, _, model, _, states, batch = run
    out = root / "merged"
    trainer = _trainer(root, seed=3)
    trainer.export(LoRACLIPClassifier(num_classes=12, head_dropout=0.0), tiny_datamodule(num_clients=3),
                   ckpt_path="last", out=str(out), merged=True)  # fmt: skip
    complete = {**batch, "image_present": torch.ones_like(batch["image_present"]),
                "text_present": torch.ones_like(batch["text_present"])}  # fmt: skip
    manifest = json.loads((out / MANIFEST).read_text())
    for folder, state in states.items():
        assert {f"{folder}/open_clip_config.json", f"{folder}/open_clip_model.safetensors"} <= set(manifest["files"])
        expected = _expected(model, state, complete)
        torch.manual_seed(999)  # plain open_clip's random init is overwritten by the merged weights
        clip = open_clip.create_model(f"local-dir:{out / folder}").eval()
        head = torch.nn.Sequential(torch.nn.Linear(128, 256), torch.nn.GELU(), torch.nn.Dropout(0.0),
                                   torch.nn.Linear(256, 12))  # fmt: skip
        weights = load_file(str(out / folder / "head.safetensors"))
        head.load_state_dict({k.removeprefix("head."): v for k, v in weights.items()})
        pixels = model.preprocess(complete["image"])  # open_clip's normalisation (preprocess_cfg of the folder)
        cfg = json.loads((out / folder / "open_clip_config.json").read_text())["preprocess_cfg"]
        assert cfg["mean"] == pytest.approx(model.pixel_mean.flatten().tolist())
        with torch.no_grad():
            features = torch.cat([clip.encode_image(pixels, normalize=True),
                                  clip.encode_text(complete["tokens"], normalize=True)], dim=-1)  # fmt: skip
            torch.testing.assert_close(head.eval()(features), expected, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(load_classifier(out / folder)(complete), expected, rtol=1e-5, atol=1e-5)
    # the merged weights are checked like the rest: an altered file is refused
    tamper_tensor_data(out / "global" / "open_clip_model.safetensors")
    with pytest.raises(ConfigError, match=r"global/open_clip_model\.safetensors does not match its SHA-256"):
        load_classifier(out / "global")


def test_an_adapter_of_a_run_that_changed_its_backbone_is_not_loaded_as_the_model(tmp_path):
    """FLoRA merges every round into the frozen weights: its adapter on the run's initial backbone is not its model."""
    torch.manual_seed(1)
    model = LoRACLIPClassifier(num_classes=3, lora_targets=["c_fc"])
    model.configure_model()
    model.add_ranks([2])
    state = (2, model.lora_state(2), model.extra_state())
    export_adapters(model, tmp_path, state, {}, completed_rounds=1, backbone_seed=1, base_weights_changed=True)
    with pytest.raises(ConfigError, match=r"global: its run merged the adapters into the backbone.s weights"):
        load_classifier(tmp_path)
