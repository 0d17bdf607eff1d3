import pytest
import torch

from fedilora.data import SyntheticBenchmark
from fedilora.data.missing import missing_masks
from fedilora.data.partition import dirichlet_partition, iid_partition, split_client
from fedilora.errors import ConfigError
from helpers import tiny_datamodule


@pytest.mark.parametrize("kind", ["image", "text", "both"])
@pytest.mark.parametrize("rate", [0.0, 0.3, 0.7, 1.0])
def test_missing_masks(kind, rate):
    n = 1000
    image, text = missing_masks(n, rate, kind, seed=3)
    again = missing_masks(n, rate, kind, seed=3)
    assert torch.equal(image, again[0]) and torch.equal(text, again[1])
    incomplete = (~image | ~text).float().mean().item()
    tolerance = 3 * (rate * (1 - rate) / n) ** 0.5 + 1 / n
    assert abs(incomplete - rate) <= tolerance
    assert (image | text).all(), "no sample may lose both modalities"
    if kind == "image":
        assert text.all()
    if kind == "text":
        assert image.all()
    if kind == "both" and rate > 0:
        lost_image = (~image).float().sum() / max((~image | ~text).float().sum(), 1)
        assert abs(lost_image.item() - 0.5) < 0.1
    if 0 < rate < 1:
        assert not torch.equal(
            image & text, missing_masks(n, rate, kind, seed=4)[0] & missing_masks(n, rate, kind, 4)[1]
        )


def test_iid_partition_is_a_balanced_disjoint_cover():
    parts = iid_partition(103, 10, seed=0)
    assert sorted(torch.cat(parts).tolist()) == list(range(103))
    assert {len(p) for p in parts} <= {10, 11}


def test_dirichlet_partition_skews_labels_and_covers_everything():
    labels = torch.arange(1000) % 10
    parts = dirichlet_partition(labels, 5, alpha=0.1, seed=0)
    assert sorted(torch.cat(parts).tolist()) == list(range(1000))
    # with alpha=0.1 each client is dominated by a few classes
    top_share = [torch.bincount(labels[p], minlength=10).max().item() / len(p) for p in parts]
    assert sum(top_share) / len(top_share) > 0.3
    iid_top = [torch.bincount(labels[p], minlength=10).max().item() / len(p) for p in iid_partition(1000, 5, 0)]
    assert max(iid_top) < 0.2


def test_client_splits_are_disjoint():
    splits = split_client(torch.arange(100, 200), 0.1, 0.2, seed=0)
    assert [len(splits[s]) for s in ("train", "val", "test")] == [70, 10, 20]
    assert sorted(torch.cat(list(splits.values())).tolist()) == list(range(100, 200))


def test_datamodule_masks_rates_and_determinism():
    dm = tiny_datamodule(num_clients=4, missing_rate=[0.0, 0.2, 0.5, 1.0], missing_kind="both")
    dm.setup()
    again = tiny_datamodule(num_clients=4, missing_rate=[0.0, 0.2, 0.5, 1.0], missing_kind="both")
    again.setup()
    for a, b in zip(dm.missing_masks().values(), again.missing_masks().values(), strict=True):
        assert torch.equal(a, b)
    for client, rate in enumerate([0.0, 0.2, 0.5, 1.0]):
        index, image, text = dm.clients[client]["train"]
        assert abs((~image | ~text).float().mean().item() - rate) <= 1 / len(index) + 1e-9
        _, test_image, test_text = dm.clients[client]["test"]
        assert test_image.all() and test_text.all()  # the test splits are complete by default
    batch = next(iter(dm.client_dataloader(1, "train", torch.Generator().manual_seed(0))))
    assert batch["image"].dtype == torch.uint8 and batch["image"].shape[1:] == (3, 32, 32)
    assert batch["tokens"].shape == (32, 32)
    image_only = next(iter(dm.global_test_dataloader("image_only")))
    assert image_only["image_present"].all() and not image_only["text_present"].any()


def test_synthetic_benchmark_is_deterministic_and_cached(tmp_path):
    a_pool, a_test = SyntheticBenchmark(num_train=50, num_test=10, cache_dir=str(tmp_path)).load()
    assert len(list(tmp_path.glob("*.safetensors"))) == 1
    b_pool, b_test = SyntheticBenchmark(num_train=50, num_test=10, cache_dir=str(tmp_path)).load()
    c_pool, _ = SyntheticBenchmark(num_train=50, num_test=10, cache_dir=str(tmp_path / "other")).load()
    assert torch.equal(a_pool.images, b_pool.images) and a_pool.texts == b_pool.texts
    assert torch.equal(a_pool.images, c_pool.images) and torch.equal(a_test.labels, b_test.labels)
    d_pool, _ = SyntheticBenchmark(num_train=50, num_test=10, seed=1, cache_dir=str(tmp_path)).load()
    assert not torch.equal(a_pool.labels, d_pool.labels)
    # a damaged cache entry is regenerated, not trusted
    next(tmp_path.glob("*.safetensors")).write_bytes(b"garbage")
    e_pool, _ = SyntheticBenchmark(num_train=50, num_test=10, cache_dir=str(tmp_path)).load()
    assert torch.equal(a_pool.images, e_pool.images)


def test_synthetic_modalities_carry_complementary_factors():
    bench = SyntheticBenchmark(num_train=2000, num_test=10, noise=0.0)
    pool, _ = bench.load()
    from fedilora.data.synthetic import KEYWORDS

    image_group, text_group = pool.labels // bench.text_groups, pool.labels % bench.text_groups
    topic = torch.tensor(
        [next(t for t, words in enumerate(KEYWORDS) if set(words) & set(s.split())) for s in pool.texts]
    )
    assert torch.equal(topic, text_group)  # the text reveals exactly the text factor
    # the square's colour reveals the image factor: 4x4 pooling averages the background noise away, and
    # the pooled cell farthest from grey lies inside the square
    from fedilora.data.synthetic import PALETTE

    pooled = torch.nn.functional.avg_pool2d(pool.images.float(), 4)
    flat = pooled.flatten(2)
    cell = (flat - 128).norm(dim=1).argmax(dim=1)
    colour = flat[torch.arange(len(flat)), :, cell]
    nearest = torch.cdist(colour, torch.tensor(PALETTE[:4], dtype=torch.float32)).argmin(dim=1)
    assert (nearest == image_group).float().mean() > 0.97


@pytest.mark.parametrize(
    ("kwargs", "option"),
    [({"missing_rate": 1.5}, "data.missing_rate"), ({"missing_rate": [0.1, 0.2]}, "data.missing_rate"),
     ({"test_missing_rate": -0.1}, "data.test_missing_rate"), ({"num_clients": 0}, "data.num_clients"),
     ({"val_fraction": 0.6, "test_fraction": 0.5}, "data.val_fraction"),
     ({"missing_kind": "audio"}, "data.missing_kind")],
)  # fmt: skip
def test_bad_data_options(kwargs, option):
    with pytest.raises(ConfigError, match=option):
        tiny_datamodule(**kwargs)


def test_too_many_clients_for_the_data():
    with pytest.raises(ConfigError, match=r"data\.num_clients"):
        tiny_datamodule(num_clients=80, num_train=60).setup()


@pytest.mark.parametrize(("parts", "workers"), [(2, 0), (3, 0), (4, 0), (3, 1)])
def test_global_test_shards_are_the_whole_sets_batches_without_padding(parts, workers):
    # workers=1: the shard is cut the same way from the persistent worker pool's batches
    dm = tiny_datamodule(num_test=150, eval_batch_size=32, test_missing_rate=0.5, num_workers=workers)
    dm.setup()
    whole = list(dm.global_test_dataloader("missing"))  # 5 batches: 4 of 32 and one of 22
    shards = [list(dm.global_test_dataloader("missing", shard=(i, parts))) for i in range(parts)]
    assert all(shards), "every process gets at least one batch"
    joined = [batch for shard in shards for batch in shard]
    assert [len(b["label"]) for b in joined] == [32, 32, 32, 32, 22]  # each sample once, nothing repeated
    for mine, reference in zip(joined, whole, strict=True):  # the very batches of one process, masks included
        assert mine.keys() == reference.keys()
        assert all(torch.equal(mine[k], reference[k]) for k in reference)
    assert len(dm.global_test_dataloader(shard=(0, 1))) == len(whole)
    with pytest.raises(ValueError, match="shard 2 of 2"):
        dm.global_test_dataloader(shard=(2, 2))
    dm.teardown()
