"""The personalized-state store: LRU spilling under a budget, exact read-back, atomic files, checkpoint form."""

import os
import random

import pytest
import torch

from fedilora.errors import ConfigError
from fedilora.personal import PersonalStore, state_nbytes, write_atomically


def _state(client: int, rank: int = 2, dtype=torch.float32):
    generator = torch.Generator().manual_seed(client)
    # keys deliberately out of sorted order: the order must come back as stored
    lora = {"z.lora_A.weight": torch.randn(rank, 3, generator=generator, dtype=dtype),
            "a.lora_B.weight": torch.randn(3, rank, generator=generator, dtype=dtype)}  # fmt: skip
    extra = {"head.0.weight": torch.randn(4, 3, generator=generator, dtype=dtype)}
    return rank, lora, extra


ONE = state_nbytes(*_state(0)[1:])  # 6*4 + 6*4 + 12*4 = 96 bytes


def _same(a, b) -> bool:
    return (
        a[0] == b[0]
        and list(a[1]) == list(b[1])
        and list(a[2]) == list(b[2])
        and all(torch.equal(a[i][k], b[i][k]) and a[i][k].dtype == b[i][k].dtype for i in (1, 2) for k in a[i])
    )


def test_least_recently_used_is_spilled_first(tmp_path):
    store = PersonalStore(tmp_path, budget_bytes=2 * ONE)
    store[0], store[1] = _state(0), _state(1)
    assert store.in_ram() == [0, 1] and store.writes == 0  # within budget: nothing written
    store[2] = _state(2)
    assert store.in_ram() == [1, 2] and store.writes == 1  # 0 was the least recently used
    store[1]  # noqa: B018  (a read makes 1 the most recent)
    store[3] = _state(3)
    assert store.in_ram() == [1, 3]  # so 2 goes, not 1
    assert _same(store[0], _state(0)) and store.reads == 1  # read back from its file, exactly
    assert store.in_ram() == [3, 0]
    assert list(store) == [0, 1, 2, 3]  # iteration: first insertion, as a dict
    store[0] = _state(10)  # replacing keeps the place
    assert list(store) == [0, 1, 2, 3] and _same(store[0], _state(10))


def test_budget_is_respected_and_every_state_reads_back_exactly(tmp_path):
    rng = random.Random(0)
    store = PersonalStore(tmp_path, budget_bytes=3 * ONE + ONE // 2)
    reference = {}
    for step in range(300):
        client = rng.randrange(12)
        if rng.random() < 0.5 or client not in reference:
            reference[client] = _state(1000 * step + client, rank=rng.choice([1, 2]), dtype=rng.choice(
                [torch.float32, torch.float64, torch.bfloat16]))  # fmt: skip
            store[client] = reference[client]
        else:
            assert _same(store[client], reference[client])
        in_ram = sum(state_nbytes(*reference[c][1:]) for c in store.in_ram())
        assert store.ram_bytes == in_ram <= store.budget_bytes
    assert store.writes > 0 and store.reads > 0
    assert all(_same(store[c], reference[c]) for c in reference)
    assert store.rank(3) == reference[3][0]


def test_zero_budget_spills_every_state_and_no_limit_spills_none(tmp_path):
    tight = PersonalStore(tmp_path / "tight", budget_bytes=0)
    free = PersonalStore(tmp_path / "free", budget_bytes=None)
    for c in range(5):
        tight[c] = free[c] = _state(c)
    assert tight.in_ram() == [] and tight.ram_bytes == 0 and tight.writes == 5
    assert free.in_ram() == list(range(5)) and free.writes == 0 and not (tmp_path / "free").exists()
    assert all(_same(tight[c], free[c]) for c in range(5))


def test_a_file_is_written_atomically(tmp_path, monkeypatch):
    target = tmp_path / "client_0.1.safetensors"
    write_atomically(target, b"old")

    def power_cut(fd):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", power_cut)
    with pytest.raises(OSError):
        write_atomically(target, b"new content")
    assert target.read_bytes() == b"old"  # never half-written under the real name
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]  # and no temporary left behind


def test_checkpoint_form_names_spilled_files_and_loads_back(tmp_path):
    store = PersonalStore(tmp_path / "personal", budget_bytes=ONE)
    for c in range(3):
        store[c] = _state(c)
    snapshot = store.snapshot()
    form = snapshot.to_checkpoint(tmp_path / "checkpoints")
    assert "lora" in form["2"] and "file" in form["0"] and "file" in form["1"]  # the last one is still in RAM
    assert form["0"]["file"].startswith("../personal/client_0.")
    again = PersonalStore(None, budget_bytes=None)
    again.load(form, tmp_path / "checkpoints")
    assert list(again) == [0, 1, 2] and all(_same(again[c], _state(c)) for c in range(3))


@pytest.mark.parametrize("damage", ["missing", "flipped byte", "truncated"])
def test_a_missing_or_damaged_file_is_one_clear_error_naming_it(tmp_path, damage):
    store = PersonalStore(tmp_path / "personal", budget_bytes=0)
    store[7] = _state(7)
    form = store.snapshot().to_checkpoint(tmp_path)
    path = tmp_path / form["7"]["file"]
    data = path.read_bytes()
    if damage == "missing":
        path.unlink()
    elif damage == "flipped byte":
        path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    else:
        path.write_bytes(data[:-10])
    with pytest.raises(ConfigError, match=str(path)) as err:
        PersonalStore().load(form, tmp_path)
    assert ("does not exist" if damage == "missing" else "is damaged") in str(err.value)
    # under a running store: reading a file that vanished is the same kind of error, never a wrong state
    if damage == "missing":
        with pytest.raises(ConfigError, match="client 7: .* cannot be read"):
            store[7]  # noqa: B018


def test_replaced_states_files_are_deleted_unless_a_kept_checkpoint_names_them(tmp_path):
    store = PersonalStore(tmp_path, budget_bytes=0)
    store[0], store[1] = _state(0), _state(1)
    store.pin("round-1.ckpt", store.snapshot())
    first = {c: store._entries[c].file for c in (0, 1)}
    store[0] = _state(100)  # client 0 trained again: its old file is named by round-1.ckpt only
    assert store.collect(["round-1.ckpt"]) == 0 and first[0].exists()
    assert store.collect([]) == 1 and not first[0].exists()  # round-1.ckpt pruned: the old file goes
    assert first[1].exists() and _same(store[1], _state(1)) and _same(store[0], _state(100))
