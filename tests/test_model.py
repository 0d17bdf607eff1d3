import pytest
import torch

from fedilora.backbone import count_parameters
from fedilora.errors import ConfigError
from fedilora.model import LoRACLIPClassifier
from helpers import tiny_datamodule, tiny_model


def _batch(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "image": torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8),
        "tokens": torch.randint(1, 400, (n, 32), generator=g),
        "label": torch.randint(0, 12, (n,), generator=g),
        "image_present": torch.ones(n, dtype=torch.bool),
        "text_present": torch.ones(n, dtype=torch.bool),
    }


def test_lora_adapts_every_targeted_module_and_only_lora_and_head_train():
    model = tiny_model(ranks=(4,))
    # peft initialises B to zero; give B values so that gradients reach A too
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02)
    frozen = {n: p.detach().clone() for n, p in model.backbone.named_parameters() if "lora_" not in n}
    batch = _batch()
    model.eval()  # no dropout: outputs differ only through the update
    before = model(batch).detach()
    optimizer = model.configure_optimizers()
    loss = model.training_step(batch, 0)
    loss.backward()
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    attn = [n for n in lora if ".attn.lora_A" in n or ".attn.base_layer.out_proj.lora_A" in n]
    assert attn, "LoRA must sit on the attention (in_proj and out_proj)"
    assert any(".mlp.c_fc." in n for n in lora) and any(".mlp.c_proj." in n for n in lora)
    assert any("visual." in n for n in lora) and any(".transformer.resblocks" in n and "visual" not in n for n in lora)
    for name, param in lora.items():
        assert param.grad is not None and param.grad.abs().sum() > 0, f"no gradient for {name}"
    trainable = {id(p) for p in optimizer.param_groups[0]["params"]}
    assert trainable == {id(p) for p in model.parameters() if p.requires_grad}
    assert all(id(p) not in trainable for n, p in model.backbone.named_parameters() if "lora_" not in n)
    optimizer.step()
    after = model(batch).detach()
    assert not torch.allclose(before, after)
    for name, param in model.backbone.named_parameters():
        if "lora_" not in name:
            assert torch.equal(param, frozen[name]), f"frozen backbone weight {name} changed"


def test_several_ranks_share_one_backbone_and_swap_exactly():
    model = tiny_model(ranks=(2, 8))
    model.use_rank(2)
    r2 = model.lora_state()
    assert all(v.shape[0] == 2 for k, v in r2.items() if ".lora_A." in k)
    model.use_rank(8)
    r8 = {k: torch.randn_like(v) for k, v in model.lora_state().items()}
    model.load_lora_state(r8)
    torch.testing.assert_close(model.lora_state(8), r8)
    torch.testing.assert_close(model.lora_state(2), r2)  # the other rank's adapter is untouched
    trainable = [n for n, p in model.backbone.named_parameters() if p.requires_grad]
    assert trainable and all(".rank_8." in n for n in trainable)


def test_backbone_held_once_whatever_the_number_of_clients(tmp_path):
    from fedilora.trainer import FederatedTrainer

    counts = {}
    for num_clients in (2, 20):
        model = LoRACLIPClassifier(num_classes=12)
        trainer = FederatedTrainer(rounds=1, clients_per_round=2, ranks=[4, 2] * (num_clients // 2),
                                   max_local_steps=1, root_dir=str(tmp_path), progress=False)  # fmt: skip
        trainer.fit(model, tiny_datamodule(num_clients=num_clients, num_train=600))
        counts[num_clients] = count_parameters(model)
        clip_params = count_parameters(model.clip)
        # what the trainer keeps per client is adapters and heads only, far below one backbone
        per_client = [sum(t.numel() for t in (*lora.values(), *extra.values())) for _, lora, extra in
                      trainer.personal.values()]  # fmt: skip
        assert max(per_client) < clip_params / 10
    assert counts[2] == counts[20]


@pytest.mark.parametrize("strategy", ["zero", "learned"])
def test_missing_modalities_change_the_prediction_and_train(strategy):
    model = tiny_model(ranks=(4,), missing_strategy=strategy, head_dropout=0.0)
    model.eval()
    batch = _batch(4)
    full = model(batch)
    no_text = model({**batch, "text_present": torch.zeros(4, dtype=torch.bool)})
    assert not torch.allclose(full, no_text)
    if strategy == "learned":
        no_text.sum().backward()
        assert model.missing_embedding["text"].grad.abs().sum() > 0
        assert model.missing_embedding["image"].grad is None or model.missing_embedding["image"].grad.abs().sum() == 0


def test_zero_strategy_is_zero_pixels_and_empty_text():
    model = tiny_model(ranks=(4,), head_dropout=0.0)
    model.eval()
    batch = _batch(3)
    masked = model({**batch, "image_present": torch.tensor([False, True, True]),
                    "text_present": torch.tensor([True, False, True])})  # fmt: skip
    zeroed = dict(batch)
    zeroed["image"] = batch["image"].clone()
    expected_pixels = model.preprocess(batch["image"])
    expected_pixels[0] = 0
    tokens = batch["tokens"].clone()
    tokens[1] = model.empty_tokens
    clip = model.clip
    feats = torch.cat(
        [clip.encode_image(expected_pixels, normalize=True), clip.encode_text(tokens, normalize=True)], -1
    )
    torch.testing.assert_close(masked, model.head(feats))


@pytest.mark.parametrize(
    ("kwargs", "option"),
    [({"lora_targets": ["out_proj"]}, "model.lora_targets"), ({"lora_towers": ["audio"]}, "model.lora_towers"),
     ({"model_name": "NoSuchModel"}, "model.model_name"), ({"missing_strategy": "mean"}, "model.missing_strategy"),
     ({"lr": 0.0}, "model.lr")],
)  # fmt: skip
def test_bad_model_options(kwargs, option):
    with pytest.raises(ConfigError, match=option):
        LoRACLIPClassifier(**kwargs)


def test_offline_pretrained_tag_fails_with_alternatives():
    model = LoRACLIPClassifier(model_name="ViT-B-32", pretrained="no_such_tag")
    with pytest.raises(ConfigError, match="local checkpoint path or null"):
        model.configure_model()


def test_attention_lora_is_w_plus_scaled_ba_and_leaves_weights_alone():
    from peft import get_peft_model

    from fedilora.backbone import FunctionalLoraMHA, build_clip, lora_config, lora_target_regex

    torch.manual_seed(0)
    clip = build_clip("fedilora-tiny", None)
    config = lora_config(4, lora_target_regex(["attn"], ["visual"]), scale=0.5, alpha=None, dropout=0.0)
    ours = get_peft_model(clip, config, adapter_name="test")
    layer = ours.get_base_model().visual.transformer.resblocks[0].attn
    assert type(layer) is FunctionalLoraMHA
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    mha, out = layer.get_base_layer(), layer.get_base_layer().out_proj
    reference = torch.nn.MultiheadAttention(64, mha.num_heads, batch_first=mha.batch_first)
    with torch.no_grad():  # the adapted attention written out by hand: W + s * B @ A, s = 0.5
        reference.in_proj_weight.copy_(
            mha.in_proj_weight + 0.5 * layer.lora_B["test"].weight @ layer.lora_A["test"].weight
        )
        reference.in_proj_bias.copy_(mha.in_proj_bias)
        reference.out_proj.weight.copy_(
            out.get_base_layer().weight + 0.5 * out.lora_B["test"].weight @ out.lora_A["test"].weight
        )
        reference.out_proj.bias.copy_(out.get_base_layer().bias)
    x = torch.randn(5, 17, 64)
    before = mha.in_proj_weight.detach().clone(), out.get_base_layer().weight.detach().clone()
    got = layer(x, x, x, need_weights=False)[0]
    torch.testing.assert_close(got, reference(x, x, x, need_weights=False)[0])
    layer(x, x, x, need_weights=False)
    assert torch.equal(mha.in_proj_weight, before[0]) and torch.equal(out.get_base_layer().weight, before[1])
