import json

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fedilora.cli import main
from fedilora.model import LoRACLIPClassifier
from fedilora.trainer import FederatedTrainer
from helpers import tiny_datamodule


@pytest.mark.slow
def test_two_round_demo_run(tmp_path, capsys):
    main(["fit", "--config", "configs/demo.yaml", "--trainer.rounds", "2", "--trainer.eval_every", "1",
          "--trainer.root_dir", str(tmp_path), "--trainer.progress", "false"])  # fmt: skip
    printed = capsys.readouterr().out
    run = tmp_path / "demo" / "version_0"
    results = json.loads((run / "results.json").read_text())
    chance = 1 / 12
    assert results["global"]["complete"]["acc"] > chance + 0.25
    assert "| global, complete" in printed and "| personalized, mean of" in printed
    edits = results["edits"]  # round 1 is the only round where editing can run
    assert edits["rounds_eligible"] == 1 and len(edits["per_round"]) == 1
    assert f"edits: {edits['total']} in {edits['rounds_with_edits']} of 1 rounds" in printed
    assert (run / "config.yaml").read_text().count("ranks:") == 1
    assert (run / "missing_masks.safetensors").stat().st_size > 0
    events = EventAccumulator(str(run)).Reload()
    scalars = set(events.Tags()["scalars"])
    for tag in ("global/complete/acc", "global/image_only/acc", "global/text_only/acc", "personalized/mean/acc",
                "train/loss", "comm/bytes_uploaded", "round/time_s", "edit/similarity_mean"):  # fmt: skip
        assert tag in scalars, tag
    assert any(t.startswith("personalized/client_") for t in scalars)
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2]  # TensorBoard step = round number
    assert "edit/similarity" in events.Tags()["histograms"]


def test_trainer_runs_are_reproducible_and_seed_dependent(tmp_path):
    def run(seed):
        torch.manual_seed(123)  # whatever the caller's global RNG, the trainer's seed decides
        model = LoRACLIPClassifier(num_classes=12)
        trainer = FederatedTrainer(rounds=2, clients_per_round=2, ranks=[4, 2, 2], max_local_steps=3, seed=seed,
                                   root_dir=str(tmp_path), progress=False)  # fmt: skip
        trainer.fit(model, tiny_datamodule(num_clients=3))
        return trainer.global_lora

    first, again, other = run(0), run(0), run(1)
    for key in first:
        assert torch.equal(first[key], again[key])
    assert any(not torch.equal(first[k], other[k]) for k in first)


def test_the_benchmark_needs_both_modalities(tmp_path):
    # one model trained on pooled data with modalities missing: each modality alone predicts the label
    # only partly (within its Bayes ceiling), both together much better
    datamodule = tiny_datamodule(num_clients=1, num_train=2000, num_test=600, missing_rate=0.4, val_fraction=0.0,
                                 test_fraction=0.0)  # fmt: skip
    model = LoRACLIPClassifier(num_classes=12, lr=3e-3)
    trainer = FederatedTrainer(rounds=1, clients_per_round=1, ranks=8, local_epochs=3, root_dir=str(tmp_path),
                               progress=False)  # fmt: skip
    results = trainer.fit(model, datamodule)
    acc = {condition: values["acc"] for condition, values in results["global"].items()}
    ceiling = datamodule.dataset.bayes_accuracy()
    assert acc["complete"] > acc["image_only"] + 0.3
    assert acc["complete"] > acc["text_only"] + 0.3
    assert acc["image_only"] <= ceiling["image_only"] + 0.06
    assert acc["text_only"] <= ceiling["text_only"] + 0.06
    assert acc["image_only"] > 1 / 12 + 0.05 and acc["text_only"] > 1 / 12 + 0.05
