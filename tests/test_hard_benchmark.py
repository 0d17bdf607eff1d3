"""The hard embedded benchmark and per-client missing patterns."""

import pytest
import torch

from fedilora.data import FederatedDataModule, HardSyntheticBenchmark, SyntheticBenchmark
from fedilora.data.synthetic import HARD_FILLER, HARD_KEYWORDS, PALETTE
from fedilora.errors import ConfigError


def _oracle(bench: HardSyntheticBenchmark, images: torch.Tensor, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Read the cues as an ideal observer does: the mean colour of the only coloured pixels, and the keyword."""
    pixels = images.float()
    coloured = (pixels.max(dim=1).values - pixels.min(dim=1).values) > 60
    mean = (pixels * coloured[:, None]).sum((2, 3)) / coloured.sum((1, 2)).clamp(min=1)[:, None]
    palette = torch.tensor(PALETTE[: bench.image_groups], dtype=torch.float32)
    image_group = torch.cdist(mean, palette).argmin(dim=1)
    text_group = torch.tensor([next(t for t, w in enumerate(HARD_KEYWORDS) if set(w) & set(s.split())) for s in texts])
    return image_group, text_group


def test_hard_benchmark_reaches_its_stated_ceilings_and_no_more(tmp_path):
    bench = HardSyntheticBenchmark(num_train=100, num_test=2500, cache_dir=str(tmp_path))
    _, test = bench.load()
    ceiling = bench.bayes_accuracy()
    assert ceiling == pytest.approx({"complete": 0.81, "image_only": 0.9 / 4, "text_only": 0.9 / 6})
    assert bench.num_classes == 24
    image_group, text_group = _oracle(bench, test.images, test.texts)
    truth_image, truth_text = test.labels // bench.text_groups, test.labels % bench.text_groups
    tolerance = 3 * (0.25 / len(test)) ** 0.5
    # the cues are read without error up to the corruption noise: the stated ceilings are reached
    assert (image_group == truth_image).float().mean().item() == pytest.approx(0.9, abs=tolerance)
    assert (text_group == truth_text).float().mean().item() == pytest.approx(0.9, abs=tolerance)
    both = ((image_group == truth_image) & (text_group == truth_text)).float().mean().item()
    assert both == pytest.approx(ceiling["complete"], abs=tolerance)
    # one modality leaves the other factor at chance: guessing it (here: always factor 0) meets the ceilings
    image_only = (image_group * bench.text_groups == test.labels).float().mean().item()
    text_only = (text_group == test.labels).float().mean().item()
    assert image_only == pytest.approx(ceiling["image_only"], abs=tolerance)
    assert text_only == pytest.approx(ceiling["text_only"], abs=tolerance)


def test_hard_benchmark_cues_are_weak_and_vocabularies_disjoint(tmp_path):
    bench = HardSyntheticBenchmark(num_train=300, num_test=10, noise=0.0, cache_dir=str(tmp_path))
    pool, _ = bench.load()
    pixels = pool.images.float()
    coloured = (pixels.max(dim=1).values - pixels.min(dim=1).values) > 60
    # the coloured square covers a few percent of the image (5 to 8 pixels a side of 32)
    assert coloured.float().mean((1, 2)).max() <= 64 / 1024 + 1e-9
    assert not set(HARD_FILLER) & {w for words in HARD_KEYWORDS for w in words}
    assert all(sum(w in s.split() for words in HARD_KEYWORDS for w in words) == 1 for s in pool.texts)
    lengths = [len(s.split()) for s in pool.texts]
    assert min(lengths) == 5 and max(lengths) == 11  # 4 to 10 filler words and the keyword


def test_hard_and_plain_benchmarks_cache_apart(tmp_path):
    hard_pool, _ = HardSyntheticBenchmark(num_train=40, num_test=10, cache_dir=str(tmp_path)).load()
    plain_pool, _ = SyntheticBenchmark(num_train=40, num_test=10, cache_dir=str(tmp_path)).load()
    assert len(list(tmp_path.glob("*.safetensors"))) == 2
    again, _ = HardSyntheticBenchmark(num_train=40, num_test=10, cache_dir=str(tmp_path)).load()
    assert torch.equal(hard_pool.images, again.images) and hard_pool.texts == again.texts
    assert not torch.equal(hard_pool.images, plain_pool.images)
    other, _ = HardSyntheticBenchmark(num_train=40, num_test=10, distractors=0, cache_dir=str(tmp_path)).load()
    assert not torch.equal(hard_pool.images, other.images)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"square_size": [9, 5]}, "data.dataset.square_size"), ({"square_size": [5]}, "data.dataset.square_size"),
     ({"distractors": -1}, "data.dataset.distractors: must be >= 0"), ({"noise": 1.0}, "data.dataset.noise"),
     ({"filler_words": [3, 40]}, "data.dataset.filler_words"), ({"image_groups": 9}, "data.dataset.image_groups")],
)  # fmt: skip
def test_hard_benchmark_bad_options(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        HardSyntheticBenchmark(**kwargs)


PATTERN = {"missing_rate": [0.0, 1.0, 1.0, 0.5], "missing_kind": ["both", "text", "image", "both"]}


def _datamodule(**kwargs) -> FederatedDataModule:
    return FederatedDataModule(dataset=SyntheticBenchmark(num_train=400, num_test=60), num_clients=4, **kwargs)


def test_per_client_missing_patterns():
    dm = _datamodule(**PATTERN)
    dm.setup()
    for split in ("train", "val"):
        _, image, text = dm.clients[0][split]
        assert image.all() and text.all()  # complete client
        _, image, text = dm.clients[1][split]
        assert image.all() and not text.any()  # image-only client
        _, image, text = dm.clients[2][split]
        assert text.all() and not image.any()  # text-only client
    _, image, text = dm.clients[3]["train"]
    assert abs((~image | ~text).float().mean().item() - 0.5) <= 1 / len(image)
    assert (~image).any() and (~text).any() and (image | text).all()
    # by default the clients' test splits follow test_missing_rate (0: complete)
    for client in range(4):
        _, image, text = dm.clients[client]["test"]
        assert image.all() and text.all()


def test_personal_test_follows_the_clients_own_pattern():
    dm = _datamodule(**PATTERN, personal_test_missing="own")
    dm.setup()
    assert dm.clients[1]["test"][1].all() and not dm.clients[1]["test"][2].any()
    assert dm.clients[2]["test"][2].all() and not dm.clients[2]["test"][1].any()
    assert dm.clients[0]["test"][1].all() and dm.clients[0]["test"][2].all()
    # the global test set is untouched: every condition is still reported on all of it
    batch = next(iter(dm.global_test_dataloader("complete")))
    assert batch["image_present"].all() and batch["text_present"].all()


def test_one_kind_for_all_clients_gives_the_same_masks_as_a_list_of_it():
    one = _datamodule(missing_rate=0.4, missing_kind="image")
    listed = _datamodule(missing_rate=0.4, missing_kind=["image"] * 4)
    one.setup()
    listed.setup()
    for a, b in zip(one.missing_masks().values(), listed.missing_masks().values(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"missing_kind": ["both", "text"]}, "data.missing_kind: 2 kinds given for 4 clients"),
     ({"missing_kind": ["both", "text", "audio", "image"]}, r"data.missing_kind: unknown 'audio' \(client 2\)"),
     ({"personal_test_missing": "mine"}, "data.personal_test_missing: unknown 'mine'")],
)  # fmt: skip
def test_bad_missing_patterns(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        _datamodule(**kwargs)
