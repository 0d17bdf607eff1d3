"""DataLoader workers that survive across rounds (``data.num_workers > 0``): one pool per datamodule, the
same batches and the same global RNG stream as ``num_workers: 0``, and data errors that stay one line."""

from __future__ import annotations

import os
import re

import pytest
import torch

from fedilora.data import DataError, FederatedDataModule
from fedilora.data.datamodule import PoolLoader
from fedilora.trainer import FederatedTrainer
from helpers import tiny_datamodule, tiny_model
from test_datasets_fixtures import make_table, table


def _files_datamodule(tmp_path, num_workers: int, **kwargs) -> FederatedDataModule:
    path = make_table(tmp_path, n=24)
    dm = FederatedDataModule(
        dataset=table(path, test_path=str(path), cache_size=0),  # no cache: every read decodes
        num_clients=3,
        batch_size=3,
        eval_batch_size=5,
        missing_rate=0.3,
        tokenizer="fedilora-tiny",
        num_workers=num_workers,
        **kwargs,
    )
    dm.setup()
    return dm


def _rounds(dm: FederatedDataModule, rounds: int = 3) -> list:
    """What a run reads, in a run's order: each round every client's training batches (seeded per round
    and client, stopped early like ``max_local_steps``) and then its test split and the global test set.
    Records each batch and the global RNG right after each ``iter()`` (dropout draws from it next)."""
    seen = []
    for r in range(rounds):
        for client in range(dm.num_clients):
            torch.manual_seed(100 * r + client)
            loader = dm.client_dataloader(client, "train", torch.Generator().manual_seed(10 * r + client))
            iterator = iter(loader)
            seen.append(("rng", torch.random.get_rng_state()))
            seen.extend(b for _, b in zip(range(2), iterator, strict=False))  # 2 of the client's 3 batches
            seen.extend(dm.client_dataloader(client, "test"))
        seen.extend(dm.global_test_dataloader("missing" if r % 2 else "complete"))
    return seen


def _equal(a, b) -> bool:
    if isinstance(a, tuple):
        return a[0] == b[0] and torch.equal(a[1], b[1])
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_workers_start_once_and_give_the_batches_and_rng_of_no_workers(tmp_path):
    reference = _rounds(_files_datamodule(tmp_path / "a", 0))
    dm = _files_datamodule(tmp_path / "b", 2)
    loader = dm.client_dataloader(0, "train", torch.Generator().manual_seed(0))
    assert isinstance(loader, PoolLoader) and len(loader) == len(dm.clients[0]["train"][0]) // 3
    seen = _rounds(dm)
    assert len(seen) == len(reference) and len(reference) > 40
    assert all(_equal(a, b) for a, b in zip(seen, reference, strict=True))
    pool = dm._pool
    # the mechanism ran: 3 rounds x 3 clients x (train + test) + 3 global test reads, on one start of 2 workers
    assert pool.starts == 1 and pool.reads == 3 * 3 * 2 + 3
    workers = list(pool.loader._iterator._workers)
    pids = [w.pid for w in workers]
    assert len(pids) == 2 and all(pid != os.getpid() for pid in pids)
    _rounds(dm, rounds=1)
    assert [w.pid for w in pool.loader._iterator._workers] == pids and pool.starts == 1  # the same processes
    dm.teardown()
    assert dm._pool is None and all(w.is_alive() is False for w in workers)  # teardown stopped them


def test_shuffling_follows_the_generator_not_the_workers(tmp_path):
    dm = _files_datamodule(tmp_path, 1)

    def order(seed: int) -> list[tuple]:
        batches = dm.client_dataloader(1, "train", torch.Generator().manual_seed(seed))
        return [tuple(row) for b in batches for row in b["tokens"].tolist()]  # "sample number <i>": one per sample

    first = order(7)
    assert order(7) == first  # the same seed after other reads of the pool: the same order
    assert order(8) != first and sorted(order(8)) == sorted(first)  # another seed: another order of the same samples


def test_interleaved_reads_of_the_pool_fail_loudly(tmp_path):
    dm = _files_datamodule(tmp_path, 1)
    first = iter(dm.client_dataloader(0, "train", torch.Generator().manual_seed(0)))
    next(first)
    list(dm.client_dataloader(1, "test"))  # a second read while the first is unfinished
    with pytest.raises(RuntimeError, match="two reads of the datamodule's DataLoader workers interleave"):
        next(first)


def test_a_bad_image_read_by_a_running_worker_is_one_line_with_the_client(tmp_path):
    dm = _files_datamodule(tmp_path, 1)
    path = tmp_path / "pics" / "004.png"
    owner = next(c for c in range(3) if 4 in dm.clients[c]["train"][0].tolist())
    other = (owner + 1) % 3
    list(dm.client_dataloader(other, "train", torch.Generator().manual_seed(0)))  # workers started, image intact
    path.write_bytes(path.read_bytes()[:60])  # the file breaks during the run (workers read files, not copies)
    assert dm._pool.starts == 1
    with pytest.raises(DataError) as error:
        list(dm.client_dataloader(owner, "train", torch.Generator().manual_seed(0)))
    message = str(error.value)
    assert re.match(rf"client {owner}'s train split: .*data\.csv line 6: image file .*pics/004\.png cannot", message)
    assert "\n" not in message and "Traceback" not in message and "worker" not in message
    assert dm._pool.starts == 1  # raised by the pool's running worker, not by a fresh one


def _fit(tmp_path, num_workers: int) -> tuple[dict, FederatedDataModule]:
    dm = tiny_datamodule(num_clients=3, num_train=300, num_test=40, batch_size=16, num_workers=num_workers)
    reads = []
    original = FederatedDataModule._loader

    def counting(self, view, split, generator, *shard):
        loader = original(self, view, split, generator, *shard)
        reads.append(type(loader).__name__)
        return loader

    trainer = FederatedTrainer(rounds=2, clients_per_round=2, ranks=[4, 2, 4], max_local_steps=2, seed=0,
                               root_dir=str(tmp_path), progress=False, eval_every=1)  # fmt: skip
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(FederatedDataModule, "_loader", counting)
        trainer.fit(tiny_model(ranks=(4,)), dm)
    return {"lora": trainer.global_lora, "history": trainer.history, "reads": reads}, dm


@pytest.mark.slow
def test_a_run_with_workers_equals_the_run_without(tmp_path):
    without, _ = _fit(tmp_path / "a", 0)
    with_workers, dm = _fit(tmp_path / "b", 1)
    assert set(without["reads"]) == {"DataLoader"} and set(with_workers["reads"]) == {"PoolLoader"}
    assert len(with_workers["reads"]) == len(without["reads"]) > 4  # every read went through the pool
    assert without["lora"].keys() == with_workers["lora"].keys()
    assert all(torch.equal(without["lora"][k], with_workers["lora"][k]) for k in without["lora"])
    for a, b in zip(without["history"], with_workers["history"], strict=True):
        keys = [k for k in a if "time" not in k]
        assert keys and all(a[k] == b[k] for k in keys)
    assert dm._pool is None  # fit's end stopped the workers
