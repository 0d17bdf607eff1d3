"""Secure aggregation (and DP clipping) in the Flower apps: the masking runs on the ClientApp.

``LocalGrid`` runs fedilora's ClientApp in this process, one ``Context`` per node kept between
messages (what a SuperNode does), and records every message and reply, so the tests can look at what
the server sent and received. The last test runs the same on a loopback Flower deployment.

Equal means bit for bit: every client computes its contribution with the simulator's own function
from the payload it received, the fixed-point sum of masked vectors is exact (masks cancel modulo
2^62), and the server releases with the same code and noise generator.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr", reason="fedilora[flower] needs Python >= 3.11 and flwr")

from flwr.app import Context, Error, Message, RecordDict

from fedilora.callbacks import FederatedCallback
from fedilora.privacy.secagg import MaskingKey
from test_flower import (
    FailFrom,  # noqa: F401  (`fedilora fit`'s lost client, by class path here)
    federation,  # noqa: F401  (the fixture: a loopback Flower federation, stopped after)
)

ROOT = Path(__file__).resolve().parents[1]
SECURE = "--trainer.secure_aggregation=fedilora.privacy.SecureAggregation"
DP = [
    "--trainer.privacy=fedilora.privacy.DifferentialPrivacy",
    "--trainer.privacy.init_args.clip_norm=0.05",
    "--trainer.privacy.init_args.noise_multiplier=0.3",
    "--trainer.privacy.init_args.adaptive_clipping=true",
    # seeded noise, so that Flower and `fedilora fit` can be compared bit for bit (NOT PRIVATE: tests only)
    "--trainer.privacy.init_args.reproducible_noise=true",
    "--trainer.privacy.init_args.log_client_metrics=true",
]
OVERRIDES = [
    "--trainer.aggregator=DimensionWise",  # the paper's rule; the DP tests run the default, DimensionWiseDelta
    "--data.num_clients=3",
    "--trainer.clients_per_round=3",
    "--data.dataset.init_args.num_train=150",
    "--data.dataset.init_args.num_test=30",
    "--trainer.max_local_steps=2",
    "--trainer.progress=false",
    "--trainer.rounds=2",
    "--trainer.eval_every=2",
    "--trainer.ranks=[8,4,2]",
    "--trainer.checkpoint_every=1",
    "--trainer.keep_last=10",
]
DEFAULT = OVERRIDES[1:]  # demo.yaml's aggregator: DimensionWiseDelta


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch):
    """Messages are stamped with the run/node/task of the Flower process creating them; here there is none."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 1), ("_node_id", 1), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


class LocalGrid:
    """Nodes 101.. are clients 0.. running fedilora's ClientApp here; a node's ``Context`` lives for the
    run. ``fail`` maps (message type, client) to the round from which that handler raises (Flower then
    replies with an error). ``log`` holds every (message, reply)."""

    def __init__(self, num_clients: int, fail: dict[tuple[str, int], int] | None = None) -> None:
        self.contexts = {
            100 + k + 1: Context(run_id=1, node_id=100 + k + 1, node_config={"partition-id": k}, state=RecordDict(),
                                 run_config={})
            for k in range(num_clients)
        }  # fmt: skip
        self.fail, self.log, self.queued, self.count = fail or {}, [], [], 0

    def get_node_ids(self):
        return list(self.contexts)

    def push_messages(self, messages):
        from fedilora.flower.client_app import app

        ids = []
        for message in messages:
            self.count += 1
            message.metadata.__dict__["_message_id"] = f"m{self.count}"
            node = message.metadata.dst_node_id
            client, kind = node - 101, message.metadata.message_type
            config = message.content.config_records["config"]
            if int(config.get("round", -1)) >= self.fail.get((kind, client), math.inf):
                reply = Message(Error(code=0, reason=f"{kind} handler of client {client} failed"), reply_to=message)
            else:
                reply = app(message, self.contexts[node])
            self.log.append((message, reply))
            self.queued.append(reply)
            ids.append(f"m{self.count}")
        return ids

    def pull_messages(self, message_ids):
        ready, self.queued = self.queued, []
        return ready


def fit_reference(root: Path, name: str, overrides: list[str]) -> Path:
    from fedilora.cli import FediLoRACLI

    args = ["fit", "--config", str(ROOT / "configs" / "demo.yaml"), *overrides]
    FediLoRACLI(args=[*args, f"--trainer.root_dir={root}", f"--trainer.name={name}"])
    return root / name / "version_0"


def flower_in_process(root: Path, name: str, overrides: list[str], grid: LocalGrid) -> Path:
    """The ServerApp's ``main`` with ``grid`` as its grid."""
    from fedilora.flower.config import parse
    from fedilora.flower.server_app import FlowerTrainer

    args = [*overrides, f"--trainer.root_dir={root}", f"--trainer.name={name}"]
    parsed = parse(str(ROOT / "configs" / "demo.yaml"), args, trainer_class=FlowerTrainer)
    parsed.trainer.connect(grid, parsed.datamodule.num_clients, node_timeout=5, round_timeout=60)
    parsed.trainer.fit(parsed.model, parsed.datamodule)
    return root / name / "version_0"


def load(run: Path, rounds: int) -> dict:
    return torch.load(run / "checkpoints" / f"round-{rounds:04d}.ckpt", weights_only=True, map_location="cpu")


def assert_same_globals(a: dict, b: dict) -> None:
    for part in ("global_lora", "global_extra"):
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}/{key} differs"


#: figures that differ by construction: the server cannot take update norms of masked vectors, and what
#: a Flower client uploads is its masked vector (``fedilora fit`` counts the plain update it simulates)
NOT_COMPARABLE = ("round/time_s", "round/update_norm_ratio", "comm/bytes_uploaded")


def assert_same_history(a: list[dict], b: list[dict], skip=()) -> None:
    assert len(a) == len(b)
    for ra, rb in zip(a, b, strict=True):
        keys = {k for k in ra if not k.startswith((*NOT_COMPARABLE, *skip))}
        assert keys == {k for k in rb if not k.startswith((*NOT_COMPARABLE, "flower/", *skip))}
        for key in keys:
            assert ra[key] == rb[key] or (math.isnan(ra[key]) and math.isnan(rb[key])), (ra["round"], key)
        assert rb["comm/bytes_uploaded"] == rb["secagg/bytes_uploaded"]  # masked vectors and keys only


def assert_nothing_in_the_clear(log: list[tuple[Message, Message]]) -> None:
    """No reply carries a LoRA or head tensor; the only arrays the server gets are int64 masked vectors."""
    kinds = set()
    for message, reply in log:
        kind = message.metadata.message_type
        kinds.add(kind)
        if reply.has_error():
            continue
        arrays = reply.content.array_records
        if kind == "train.mask":
            assert list(arrays) == ["masked"] and list(arrays["masked"]) == ["vector"]
            assert arrays["masked"]["vector"].dtype == "int64"
        else:
            assert not arrays, (kind, list(arrays))
        if kind == "train":
            assert set(reply.content.config_records) <= {"update", "secagg", "refused"}
            assert "update_norm" not in reply.content.metric_records.get("metrics", {})
    assert {"train", "train.mask"} <= kinds


def masked_run_equals_fit(tmp_path, overrides: list[str]) -> tuple[LocalGrid, dict]:
    """``fedilora fit`` and the in-process Flower run of ``overrides``: their global adapter and head after
    each of the 2 rounds, and their histories, are equal; the Flower grid and last checkpoint are returned."""
    fit = fit_reference(tmp_path, "fit", overrides)
    grid = LocalGrid(3)
    flower = flower_in_process(tmp_path, "flower", overrides, grid)
    for rounds in (1, 2):
        assert_same_globals(load(fit, rounds), load(flower, rounds))
    last = load(flower, 2)
    assert_same_history(load(fit, 2)["history"], last["history"])
    return grid, last


@pytest.mark.slow
def test_masked_flower_round_equals_fit_bit_for_bit(tmp_path):
    """(1) FediLoRA with secure aggregation, ranks 8/4/2, 2 rounds: the ClientApps mask, the server sums
    masked vectors only, and the global adapter, head and every comparable metric equal ``fedilora fit``'s
    (whose server masks in one process). (3) No TRAIN reply carries an array."""
    grid, b = masked_run_equals_fit(tmp_path, [*OVERRIDES, SECURE])
    assert b["history"][-1]["personalized/num_clients"] == 3.0  # evaluated on the clients, from what they kept
    assert b["personal"] == {}  # the server never held a personalized model
    assert [h["secagg/passes"] for h in b["history"]] == [1.0, 1.0]
    assert_nothing_in_the_clear(grid.log)
    # what each client keeps: its personalized model, and no private key once it has masked
    for context in grid.contexts.values():
        assert {"fedilora-personal", "fedilora-personal-lora", "fedilora-contribution"} <= set(context.state)
        assert "private-key" not in context.state.config_records["fedilora-masking"]


@pytest.mark.slow
def test_masked_flower_round_with_dp_equals_fit_bit_for_bit(tmp_path):
    """(2) DP (adaptive clipping on the clients with the server's clip norm, noise at the server) and
    secure aggregation: the same global adapter, head, clip norms and epsilon as ``fedilora fit``."""
    grid, b = masked_run_equals_fit(tmp_path, [*DEFAULT, SECURE, *DP])
    clip = [h["privacy/clip_norm"] for h in b["history"]]
    assert clip[0] == 0.05 and clip[1] != clip[0]  # adaptive clipping moved the norm the clients clip with
    train = [m for m, _ in grid.log if m.metadata.message_type == "train"]
    assert [float(m.content.config_records["config"]["clip-norm"]) for m in train] == [clip[0]] * 3 + [clip[1]] * 3
    assert_nothing_in_the_clear(grid.log)


class Poison(FederatedCallback):
    """Client ``client`` returns NaN in round ``round`` (on its node under Flower)."""

    def __init__(self, client: int, round: int) -> None:
        self.client, self.round = client, round

    def on_client_fit_end(self, trainer, round: int, update, received) -> None:
        if (update.client_id, round) == (self.client, self.round):
            key = sorted(update.lora)[0]
            update.lora[key] = torch.full_like(update.lora[key], math.nan)


def _callbacks(*specs: tuple[str, int, int]) -> str:
    items = [
        f'{{"class_path": "{__name__}.{name}", "init_args": {{"client": {c}, "round": {r}}}}}' for name, c, r in specs
    ]
    return f"--trainer.callbacks=[{', '.join(items)}]"


@pytest.mark.slow
def test_refused_and_lost_clients_are_left_out_without_retraining(tmp_path, capsys):
    """(4) Round 0: client 2's update is NaN; its node refuses to send it (the server never sees it) with
    the reason ``fedilora fit`` gives. Round 1: client 1's mask handler fails: the pass is redone between
    clients 0 and 2 with fresh keys (no TRAIN repeated). The global state equals ``fedilora fit``'s where
    client 2 sends NaN in round 0 and client 1 fails in round 1, i.e. rounds without their contributions."""
    overrides = [*OVERRIDES, SECURE]
    fit = fit_reference(tmp_path, "fit", [*overrides, _callbacks(("Poison", 2, 0), ("FailFrom", 1, 1))])
    capsys.readouterr()
    grid = LocalGrid(3, fail={("train.mask", 1): 1})
    flower = flower_in_process(tmp_path, "flower", [*overrides, _callbacks(("Poison", 2, 0))], grid)
    for rounds in (1, 2):
        assert_same_globals(load(fit, rounds), load(flower, rounds))
    history = load(flower, 2)["history"]
    assert [h["secagg/passes"] for h in history] == [1.0, 2.0]
    assert [h["round/rejected_updates"] for h in history] == [1.0, 1.0]
    assert [h["round/num_clients"] for h in history] == [2.0, 2.0]
    out = capsys.readouterr().out
    assert "round 0: client 2 left out of the aggregation (non-finite values in" in out
    assert "round 1: client 1 left out of the aggregation (ClientLost: mask failed on its node" in out
    sent = [(m.metadata.message_type, m.content.config_records["config"].get("round")) for m, _ in grid.log]
    assert sent.count(("train", 1)) == 3  # training was not repeated
    assert sent.count(("train.keys", 1)) == 2 and sent.count(("train.mask", 1)) == 3 + 2
    assert sent.count(("train.mask", 0)) == 2  # the refused client takes no part in masking
    assert_nothing_in_the_clear(grid.log)


def test_a_key_masks_once():
    """A mask request for a round the client holds nothing of, or with its key already used (a second
    mask with one key would reveal differences of masks), is refused; the kept key is the same key."""
    from fedilora.flower.client_work import _masking

    config = {
        "round": 0,
        "client-id": 0,
        "peers": [0, 1],
        "public-keys": [b"", b""],
        "context": b"",
        "fraction-bits": 24,
    }
    with pytest.raises(RuntimeError, match="holds no contribution of round 0"):
        _masking("mask", {"config": config, "state": {}}, 0)
    used = {"config": {"fedilora-masking": {"round": 0}}, "arrays": {"fedilora-contribution": {}}}
    with pytest.raises(RuntimeError, match="has masked once already"):
        _masking("mask", {"config": config, "state": used}, 0)
    key = MaskingKey()
    assert MaskingKey(key.private).public == key.public


@pytest.mark.slow
def test_deployment_with_dp_and_secure_aggregation_equals_fit(federation, tmp_path):  # noqa: F811
    """The DP test above on a loopback deployment: a SuperLink and 3 SuperNodes (ranks from their node
    config, keep-alive workers), so the keys, contributions and personalized models live in each
    SuperNode's node state between the TRAIN and MASK messages of a round (the simulation engine keeps
    node state the same way; it is not run here to keep the suite within its time). Global adapter, head and comparable
    metrics equal ``fedilora fit``'s bit for bit."""
    overrides = [*DEFAULT, SECURE, *DP]
    fit = fit_reference(tmp_path, "fit", overrides)
    federation.start_superlink()
    for k, rank in enumerate([8, 4, 2]):
        federation.add_supernode({"partition-id": k, "rank": rank, "keep-alive": 300.0}, f"node{k}")
    flower_overrides = [*overrides, f"--trainer.root_dir={tmp_path}", "--trainer.name=deploy"]
    run_id = federation.submit(
        ROOT / "flower-app", {"config": "configs/demo.yaml", "overrides": " ".join(flower_overrides)}
    )
    federation.wait(run_id, timeout=900)
    deploy = tmp_path / "deploy" / "version_0"
    for rounds in (1, 2):
        assert_same_globals(load(fit, rounds), load(deploy, rounds))
    a, b = load(fit, 2), load(deploy, 2)
    assert_same_history(a["history"], b["history"])
    assert all(h["secagg/passes"] == 1.0 for h in b["history"]) and b["history"][-1]["privacy/epsilon"] > 0
    assert b["personal"] == {} and b["history"][-1]["personalized/num_clients"] == 3.0
