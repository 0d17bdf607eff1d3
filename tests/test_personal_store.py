"""The personalized-state store: LRU spilling under a budget, exact read-back, atomic files, checkpoint form."""

import os
import random
import re

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
    store[1]  # a read makes 1 the most recent
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
    with pytest.raises(ConfigError, match=re.escape(str(path))) as err:
        PersonalStore().load(form, tmp_path)
    assert ("does not exist" if damage == "missing" else "is damaged") in str(err.value)
    # under a running store: reading a file that vanished is the same kind of error, never a wrong state
    if damage == "missing":
        with pytest.raises(ConfigError, match=r"client 7: .* cannot be read"):
            store[7]


def test_replaced_states_files_are_deleted_unless_a_kept_checkpoint_names_them(tmp_path):
    store = PersonalStore(tmp_path, budget_bytes=0)
    store[0], store[1] = _state(0), _state(1)
    store.pin("round-1.ckpt", store.snapshot())
    first = {c: store._entries[c].file for c in (0, 1)}
    store[0] = _state(100)  # client 0 trained again: its old file is named by round-1.ckpt only
    assert store.collect(["round-1.ckpt"]) == 0 and first[0].exists()
    assert store.collect([]) == 1 and not first[0].exists()  # round-1.ckpt pruned: the old file goes
    assert first[1].exists() and _same(store[1], _state(1)) and _same(store[0], _state(100))


# ------------------------------------------------------------------------------- in a federated run
def _run(root, budget_mb, aggregator=None, callbacks=(), ckpt_path=None, rounds=3):
    from fedilora.model import LoRACLIPClassifier
    from fedilora.trainer import FederatedTrainer
    from helpers import tiny_datamodule

    options = {"aggregator": aggregator} if aggregator is not None else {}
    trainer = FederatedTrainer(rounds=rounds, clients_per_round=2, ranks=[4, 2, 2, 1], max_local_steps=1,
                               checkpoint_every=1, keep_last=2, progress=False, root_dir=str(root),
                               personal_memory_mb=budget_mb, callbacks=list(callbacks), **options)  # fmt: skip
    trainer.fit(LoRACLIPClassifier(num_classes=12), tiny_datamodule(num_clients=4, num_train=160, num_test=40),
                ckpt_path=ckpt_path)  # fmt: skip
    return trainer


def _figures(trainer):
    return [{k: v for k, v in h.items() if k != "round/time_s"} for h in trainer.history]


def _assert_same_run(a, b):
    assert _figures(a) == _figures(b)  # every metric, personalized ones included, exactly
    for mine, theirs in ((a.global_lora, b.global_lora), (a.global_extra, b.global_extra)):
        assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert list(a.personal) == list(b.personal)
    assert all(_same(a.personal[c], b.personal[c]) for c in a.personal)


@pytest.mark.slow
@pytest.mark.parametrize("aggregator", ["DimensionWise", "Local"])
def test_a_run_that_spills_every_state_equals_the_run_that_keeps_all_in_ram(tmp_path, aggregator):
    from fedilora.aggregation import DimensionWise
    from fedilora.baselines import Local

    make = {"DimensionWise": DimensionWise, "Local": Local}[aggregator]
    free = _run(tmp_path / "free", None, make())
    tight = _run(tmp_path / "tight", 0, make())  # budget 0: every state is written and read back
    # the mechanism ran: every personalized state went to disk, and evaluation (and Local's payloads) read them
    assert free.personal.writes == 0 and free.personal.in_ram() == list(free.personal)
    assert tight.personal.writes >= len(tight.personal) > 0 and tight.personal.reads > 0
    assert tight.personal.in_ram() == []
    _assert_same_run(tight, free)
    # checkpoints name the spilled files instead of holding their tensors
    from fedilora.checkpoint import load_checkpoint

    state = load_checkpoint(tight.fabric, tight.log_dir / "checkpoints" / "round-0003.ckpt")
    assert all("file" in p and "lora" not in p for p in state["personal"].values())
    # files of replaced states are gone once no kept checkpoint (keep_last=2) names them
    kept = [load_checkpoint(tight.fabric, p) for p in (tight.log_dir / "checkpoints").glob("round-*.ckpt")]
    named = {str((tight.log_dir / "checkpoints" / p["file"]).resolve()) for s in kept for p in s["personal"].values()}
    on_disk = {str(p.resolve()) for p in (tight.log_dir / "personal").glob("*.safetensors")}
    assert on_disk == named


@pytest.mark.slow
def test_resume_with_spilling_equals_the_uninterrupted_run_and_a_damaged_file_is_refused(tmp_path):
    from test_checkpoint import Crash, crash

    full = _run(tmp_path / "full", None, callbacks=[Crash()])
    with pytest.raises(RuntimeError, match="power cut"):
        _run(tmp_path / "broken", 0, callbacks=[crash(at_round=2)])
    resumed = _run(tmp_path / "broken", 0, callbacks=[Crash()], ckpt_path="last")  # reads the first run's files
    assert resumed.personal.reads > 0
    _assert_same_run(resumed, full)

    # a file the checkpoint names, damaged: one error naming it, before any round runs
    from fedilora.checkpoint import load_checkpoint

    checkpoint = tmp_path / "broken" / "fedilora" / "version_0" / "checkpoints" / "round-0002.ckpt"
    named = [p["file"] for p in load_checkpoint(full.fabric, checkpoint)["personal"].values()]
    victim = (checkpoint.parent / named[0]).resolve()
    victim.write_bytes(victim.read_bytes()[:-1] + b"\0")
    with pytest.raises(ConfigError, match=f"{re.escape(str(victim))}.* is damaged"):
        _run(tmp_path / "broken", 0, callbacks=[Crash()], ckpt_path=str(checkpoint))


def test_a_spilled_state_with_non_finite_values_is_refused_when_read(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    store = PersonalStore(tmp_path, budget_bytes=0)
    store[3] = _state(3)
    (path,) = tmp_path.glob("client_3.*.safetensors")
    with safe_open(path, framework="pt") as handle:  # the same file, one value made NaN
        metadata, tensors = handle.metadata(), {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    tensors["extra.head.0.weight"][0, 0] = float("nan")
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(ConfigError, match=r"client 3: .*client_3\..*: tensor head\.0\.weight has non-finite values"):
        store[3]
