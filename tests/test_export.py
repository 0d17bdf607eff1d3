"""Export: adapters in peft's format load back with peft's own functions and reproduce the client."""

import json

import torch
from safetensors.torch import load_file

from fedilora.backbone import build_clip
from fedilora.editing import ModelEditing
from fedilora.export import load_adapter, load_head
from fedilora.model import LoRACLIPClassifier
from fedilora.trainer import FederatedTrainer
from helpers import tiny_datamodule


def _trainer(root):
    return FederatedTrainer(rounds=2, clients_per_round=2, ranks=[4, 2, 2], max_local_steps=2, checkpoint_every=1,
                            callbacks=[ModelEditing()], root_dir=str(root), progress=False)  # fmt: skip


def test_exported_adapters_reproduce_the_trained_models(tmp_path):
    trained = _trainer(tmp_path)
    model = LoRACLIPClassifier(num_classes=12, head_dropout=0.0)
    trained.fit(model, tiny_datamodule(num_clients=3))
    fresh_model = LoRACLIPClassifier(num_classes=12, head_dropout=0.0)
    out = _trainer(tmp_path).export(fresh_model, tiny_datamodule(num_clients=3), ckpt_path="last",
                                    out=str(tmp_path / "export"))  # fmt: skip
    datamodule = tiny_datamodule(num_clients=3, missing_rate=0.5)
    datamodule.setup()
    batch = next(iter(datamodule.client_dataloader(0, "train", torch.Generator().manual_seed(0))))
    states = {"global": (4, trained.global_lora, trained.global_extra)}
    states.update({f"clients/client_{c}": s for c, s in trained.personal.items()})
    assert len(states) >= 3
    for folder, (rank, lora, extra) in states.items():
        directory = out / folder
        config = json.loads((directory / "adapter_config.json").read_text())
        assert config["r"] == rank and config["peft_type"] == "LORA"
        keys = load_file(str(directory / "adapter_model.safetensors")).keys()
        assert "base_model.model.visual.transformer.resblocks.0.attn.lora_A.weight" in keys
        assert json.loads((directory / "fedilora.json").read_text())["rank"] == rank

        model.load_client_state(rank, lora, extra)
        model.eval()
        with torch.no_grad():
            expected = model(batch)
        torch.manual_seed(trained.seed)  # the same random backbone the run started from (pretrained: null)
        fresh = LoRACLIPClassifier(num_classes=12, head_dropout=0.0)
        fresh.configure_model()
        torch.manual_seed(trained.seed)
        fresh.backbone = load_adapter(build_clip("fedilora-tiny", None), directory)
        fresh.load_extra_state(load_head(directory))
        fresh.eval()
        with torch.no_grad():
            torch.testing.assert_close(fresh(batch), expected, rtol=1e-5, atol=1e-5)
