"""Flower: message conversions, the server's node handling, and equal results through ``fedilora fit``,
the Flower simulation engine and a loopback deployment (SuperLink + 3 SuperNodes started and stopped here).

Equal means bit for bit on this CPU: the same config and seed give the same initial model, every
client trains from the same payload under the same seed, and the server runs the same round step;
Flower only carries float32 arrays, which round-trip exactly. The thread count is fixed everywhere
(``FEDILORA_FLOWER_THREADS``) because CPU kernels may sum in another order with another count.
"""

from __future__ import annotations

import math
import os
import re
import signal
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr", reason="fedilora[flower] needs Python >= 3.11 and flwr")

from flwr.app import ConfigRecord, Error, Message, RecordDict

from fedilora.aggregation import ClientUpdate
from fedilora.callbacks import FederatedCallback
from fedilora.editing import EditReport
from fedilora.errors import ConfigError
from fedilora.flower.loopback import Federation, FlowerRunError
from fedilora.flower.records import (
    from_arrays,
    info_from_json,
    info_to_json,
    reply_to_records,
    to_arrays,
    update_from_record,
)

ROOT = Path(__file__).resolve().parents[1]
APP = ROOT / "flower-app"


# ------------------------------------------------------------------------------------------ records
def test_arrays_round_trip_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    state = {
        "a.lora_A.weight": torch.randn(4, 7, generator=g),
        "b.lora_B.weight": torch.randn(7, 4, generator=g)[:, :2],
    }
    back = from_arrays(to_arrays(state))
    assert back.keys() == state.keys()
    for key, value in state.items():
        assert torch.equal(back[key], value) and back[key].dtype == value.dtype
    back["a.lora_A.weight"].add_(1.0)  # a received state is writable and owns its memory
    assert not torch.equal(back["a.lora_A.weight"], state["a.lora_A.weight"])


def test_update_reply_round_trip_keeps_everything_the_server_reads():
    report = EditReport(similarities={"x.lora_A.weight": 0.5}, edited={"x.lora_A.weight": 0.5})
    reply = {
        "arrays": {
            "lora": {"x.lora_A.weight": torch.ones(2, 3).numpy()},
            "extra": {"head.0.bias": torch.zeros(3).numpy()},
        },
        "config": {
            "update": {
                "client-id": 2,
                "rank": 2,
                "num-samples": 17,
                "train-loss": 0.25,
                "info": info_to_json({"edit_report": report}),
            }
        },
        "metrics": {"metrics": {"edits": 1.0, "update_norm": 3.5}},
    }
    update = update_from_record(reply_to_records(reply))
    assert isinstance(update, ClientUpdate)
    assert (update.client_id, update.rank, update.num_samples, update.train_loss) == (2, 2, 17, 0.25)
    assert update.metrics == {"edits": 1.0, "update_norm": 3.5}
    assert update.info["edit_report"] == report  # rebuilt as the dataclass ModelEditing reads on the server
    assert torch.equal(update.lora["x.lora_A.weight"], torch.ones(2, 3))


def test_info_rebuilds_only_fedilora_dataclasses():
    text = '{"a": {"__dataclass__": "subprocess:CompletedProcess", "fields": {"args": ["ls"], "returncode": 0}}}'
    assert info_from_json(text)["a"] == {
        "__dataclass__": "subprocess:CompletedProcess",
        "fields": {"args": ["ls"], "returncode": 0},
    }


# ------------------------------------------------------------------------------------- node config
def test_node_identity_from_node_config():
    from fedilora.flower.client_work import node_identity

    assert node_identity({"partition-id": 1}, 3, [8, 4, 2]) == (1, 4)  # rank from trainer.ranks
    assert node_identity({"partition-id": 1, "rank": 16}, 3, [8, 4, 2]) == (1, 16)  # the node's own rank
    assert node_identity({"partition-id": 2, "num-partitions": 3}, 3, 8) == (2, 8)  # simulation's node config


@pytest.mark.parametrize(
    ("node_config", "message"),
    [
        ({}, "node config: partition-id is missing; start the SuperNode with --node-config 'partition-id=K'"),
        ({"partition-id": 3}, "node config: partition-id=3 is not a client id in [0, data.num_clients=3)"),
        ({"partition-id": "a"}, "node config: partition-id='a' is not a client id"),
        ({"partition-id": 0, "rank": 0}, "node config: rank=0 must be a positive integer"),
        ({"partition-id": 0, "rank": 2.5}, "node config: rank=2.5 must be a positive integer"),
    ],
)
def test_node_identity_refuses_bad_node_config(node_config, message):
    from fedilora.flower.client_work import node_identity

    with pytest.raises(ConfigError, match=re.escape(message)):
        node_identity(node_config, 3, [8, 4, 2])


def test_config_path_not_found_names_what_was_tried(tmp_path):
    from fedilora.flower.config import resolve_path

    (tmp_path / "a.yaml").write_text("trainer: {}\n")
    assert resolve_path("a.yaml", [tmp_path / "missing", tmp_path]) == tmp_path / "a.yaml"
    with pytest.raises(ConfigError, match=r"run config `config`: b.yaml not found \(tried .*b.yaml\)"):
        resolve_path("b.yaml", [tmp_path])


def _table_config(tmp_path, classes: str) -> str:
    """The resolved config of a 2-client federation on a user's CSV (fedilora.data.generic)."""
    from fedilora.flower.config import parse
    from test_datasets_fixtures import make_table

    server_csv = make_table(tmp_path / "server", n=16)
    config = tmp_path / "table.yaml"
    config.write_text(
        f"""
trainer: {{ranks: [8, 4], clients_per_round: 2, rounds: 1, max_local_steps: 1, root_dir: {tmp_path / "runs"}}}
model: {{model_name: fedilora-tiny, head_hidden: 16}}
data:
  dataset:
    class_path: fedilora.data.generic.MultimodalTable
    init_args: {{path: {server_csv}, image_column: file, text_column: caption, label_column: tags,
                image_size: 32, test_fraction: 0.25{classes}}}
  num_clients: 2
  missing_rate: [0.0, 0.5]
  batch_size: 4
"""
    )
    return parse(str(config)).yaml


def test_a_node_trains_on_its_own_data_file(tmp_path):
    """``--node-config 'partition-id=1 data-path=...'``: the node's file replaces the config's dataset
    path; it is client 1 of the federation with its own samples, and trains on them."""
    from fedilora.flower.client_work import handle
    from test_datasets_fixtures import make_table

    yaml_text = _table_config(tmp_path, ", classes: [bird, cat, dog]")
    own = make_table(tmp_path / "node1", n=24)
    node = {"partition-id": 1, "data-path": str(own)}
    query = handle({"kind": "query", "config": {"fedilora-config": yaml_text}, "node_config": node, "arrays": {}})
    answer = query["config"]["client"]
    assert (answer["client-id"], answer["rank"]) == (1, 4)
    assert answer["num-samples"] == 14  # 24 rows: 6 held out as the global test set, 10% val, 10% test
    from fedilora.flower.client_work import _RUNTIMES

    (runtime,) = _RUNTIMES.values()
    assert runtime.parsed.datamodule.dataset.path == own and runtime.parsed.datamodule.num_clients == 1
    model = runtime.parsed.model
    model.add_ranks([4])
    arrays = {"lora": model.lora_state(4), "extra": model.extra_state(), "base": {}}
    request = {
        "kind": "train",
        "config": {"fedilora-config": yaml_text, "round": 0, "client-id": 1, "rank": 4},
        "node_config": node,
        "arrays": {name: {k: v.numpy() for k, v in state.items()} for name, state in arrays.items()},
    }
    update = update_from_record(reply_to_records(handle(request)))
    assert (update.client_id, update.rank, update.num_samples) == (1, 4, 14)
    assert math.isfinite(update.train_loss)


def test_own_data_file_must_give_the_federations_classes(tmp_path):
    """Without a class list in the config, classes come from each file: a node whose file lacks one
    would build a head of another size; the run stops with the reason instead (``fatal``)."""
    from fedilora.flower.client_work import handle
    from test_datasets_fixtures import make_table

    yaml_text = _table_config(tmp_path, "")
    own = make_table(tmp_path / "node0", n=24)
    with own.open() as handle_:
        rows = handle_.read().splitlines()
    own.write_text("\n".join([rows[0]] + [r for r in rows[1:] if not r.endswith(",bird")]) + "\n")  # 2 classes
    node = {"partition-id": 0, "data-path": str(own)}
    extra = {"head.3.weight": torch.zeros(3, 16).numpy(), "head.3.bias": torch.zeros(3).numpy()}
    request = {
        "kind": "train",
        "config": {"fedilora-config": yaml_text, "round": 0, "client-id": 0, "rank": 8},
        "node_config": node,
        "arrays": {"lora": {}, "extra": extra, "base": {}},
    }
    assert handle(request)["config"]["fatal"]["error"] == (
        "node config: data-path gives 2 classes (multiclass) but the federation's head differs (head.3.weight: "
        "(2, 16) here, (3, 16) sent); list data.dataset.init_args.classes in the config"
    )


def test_own_data_file_needs_a_file_dataset(flower_trainer_factory):
    from fedilora.flower.client_work import handle

    yaml_text = flower_trainer_factory().config_yaml  # the embedded synthetic benchmark: no file
    request = {
        "kind": "query",
        "config": {"fedilora-config": yaml_text},
        "node_config": {"partition-id": 0, "data-path": "/data/mine.csv"},
        "arrays": {},
    }
    error = handle(request)["config"]["client"]["error"]
    assert error.startswith("node config: data-path needs a file dataset in the config")


# ------------------------------------------------------------------------------ server: nodes and inbox
@pytest.fixture(autouse=True)
def _task_identity(monkeypatch):
    """Messages are stamped with the run/node/task of the Flower process creating them; here there is none."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 1), ("_node_id", 1), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


class FakeGrid:
    """Nodes answer QUERY messages with a given (client id, rank); replies come back a step late."""

    def __init__(self, answers: dict[int, dict]) -> None:
        self.answers, self.queued, self.count = answers, [], 0

    def get_node_ids(self):
        return list(self.answers)

    def push_messages(self, messages):
        ids = []
        for message in messages:
            self.count += 1
            message.metadata.__dict__["_message_id"] = f"m{self.count}"
            answer = self.answers[message.metadata.dst_node_id]
            if answer is None:
                reply = Message(Error(code=5, reason="node unavailable"), reply_to=message)
            else:
                reply = Message(RecordDict({"client": ConfigRecord(answer)}), reply_to=message)
            self.queued.append(reply)
            ids.append(f"m{self.count}")
        return ids

    def pull_messages(self, message_ids):
        ready, self.queued = self.queued[:1], self.queued[1:]
        return ready


@pytest.fixture(scope="module")
def flower_trainer_factory(tmp_path_factory):
    from fedilora.flower.config import parse
    from fedilora.flower.server_app import FlowerTrainer

    root = tmp_path_factory.mktemp("runs")

    def make(*overrides: str):
        args = [f"--trainer.root_dir={root}", "--data.num_clients=3", "--trainer.clients_per_round=3", *overrides]
        return parse(str(ROOT / "configs" / "demo.yaml"), args, trainer_class=FlowerTrainer).trainer

    return make


def test_connect_takes_each_nodes_client_id_and_rank(flower_trainer_factory):
    trainer = flower_trainer_factory()
    grid = FakeGrid({11: {"client-id": 2, "rank": 2}, 12: {"client-id": 0, "rank": 8}, 13: {"client-id": 1, "rank": 4}})
    trainer.connect(grid, 3, node_timeout=5, round_timeout=5)
    assert trainer.ranks == [8, 4, 2]
    assert trainer._nodes == {0: 12, 1: 13, 2: 11}


@pytest.mark.parametrize(
    ("answers", "message"),
    [
        (
            {1: {"client-id": 0, "rank": 8}, 2: {"client-id": 0, "rank": 4}, 3: {"client-id": 1, "rank": 4}},
            "both say partition-id=0",
        ),
        (
            {1: {"client-id": 0, "rank": 8}, 2: {"client-id": 1, "rank": 4}, 3: {"client-id": 5, "rank": 4}},
            "no SuperNode has partition-id [2]",
        ),
        (
            {
                1: {"client-id": 0, "rank": 8},
                2: {"client-id": 1, "rank": 4},
                3: {"error": "node config: partition-id is missing"},
            },
            "partition-id is missing",
        ),
        ({1: {"client-id": 0, "rank": 8}, 2: {"client-id": 1, "rank": 4}, 3: None}, "node unavailable"),
        ({1: {"client-id": 0, "rank": 8}}, "1 SuperNode(s) connected within node-timeout=0.2 s"),
    ],
)
def test_connect_refuses_a_federation_that_does_not_match_the_config(flower_trainer_factory, answers, message):
    trainer = flower_trainer_factory()
    with pytest.raises(ConfigError, match=re.escape(message)):
        trainer.connect(FakeGrid(answers), 3, node_timeout=0.2, round_timeout=5)


def test_centralized_has_no_federated_form(flower_trainer_factory):
    trainer = flower_trainer_factory("--trainer.aggregator=Centralized")
    with pytest.raises(ConfigError, match="Centralized pools every client's data"):
        trainer.connect(FakeGrid({}), 3, node_timeout=0.2, round_timeout=5)


def test_inbox_waits_for_one_key_and_gives_up_at_the_deadline():
    from fedilora.flower.server_app import Inbox

    grid = FakeGrid({1: {"client-id": 0, "rank": 8}, 2: {"client-id": 1, "rank": 4}})
    inbox = Inbox(grid)
    content = RecordDict({"config": ConfigRecord({"x": 1})})
    inbox.send({key: Message(content, dst_node_id=key, message_type="query") for key in (1, 2)})
    second = inbox.wait(2, time.monotonic() + 5)  # the reply of node 1 comes first and is kept for later
    assert second.content.config_records["client"]["client-id"] == 1
    assert inbox.wait(1, time.monotonic() + 5).content.config_records["client"]["client-id"] == 0
    assert inbox.wait(3, time.monotonic() + 0.1) is None


# ------------------------------------------------------------------ a lost SuperLink, a round with no node
class SilentGrid(FakeGrid):
    """Nodes answer QUERY; TRAIN messages get no reply (``mode="silent"``: every node is gone) or the
    SuperLink itself fails once the nodes are known (``mode="gone"``: ``pull_messages`` raises)."""

    def __init__(self, mode: str) -> None:
        super().__init__({11: {"client-id": 0, "rank": 8}, 12: {"client-id": 1, "rank": 4},
                          13: {"client-id": 2, "rank": 2}})  # fmt: skip
        self.mode, self.trains = mode, 0

    def push_messages(self, messages):
        messages = list(messages)
        if messages[0].metadata.message_type == "query":
            return super().push_messages(messages)
        self.trains += len(messages)
        return [f"t{self.trains}-{k}" for k in range(len(messages))]

    def pull_messages(self, message_ids):
        if self.mode == "gone" and self.trains:
            raise ConnectionRefusedError("[Errno 111] Connection refused")
        return super().pull_messages(message_ids)


def test_inbox_stops_at_a_failing_grid_and_never_tries_it_again():
    from fedilora.flower.server_app import Inbox, SuperLinkLost

    grid = SilentGrid("gone")
    grid.trains = 1
    inbox = Inbox(grid)
    content = RecordDict({"config": ConfigRecord({"x": 1})})
    inbox.send({1: Message(content, dst_node_id=11, message_type="train")})
    with pytest.raises(SuperLinkLost, match=r"SuperLink is gone .*pulling replies failed: ConnectionRefusedError"):
        inbox.wait(1, time.monotonic() + 5)
    grid.pull_messages = grid.get_node_ids = None  # a second call would fail on these
    with pytest.raises(SuperLinkLost):
        inbox.link("listing the nodes", grid.get_node_ids)


def test_an_unreachable_superlink_ends_a_grid_call_within_link_timeout():
    """Flower's HTTP grid retries a SuperLink it cannot reach forever; ``bound_retries`` makes it give up."""
    from flwr.superlink.grid import HttpGrid

    from fedilora.flower.loopback import free_port
    from fedilora.flower.server_app import Inbox, SuperLinkLost, bound_retries

    grid = HttpGrid(runtime_api_address=f"127.0.0.1:{free_port()}", insecure=True, token="t")  # nothing listens
    assert bound_retries(grid, 2.0) and grid._retry_invoker.max_time == 2.0
    started = time.monotonic()
    with pytest.raises(SuperLinkLost, match=r"listing the nodes failed: ConnectError"):
        Inbox(grid).link("listing the nodes", grid.get_node_ids)
    assert time.monotonic() - started < 15  # 2 s, plus the backoff wait under way when it expired
    assert not bound_retries(FakeGrid({}), 2.0)  # a grid without Flower's invoker (the in-memory one) is left alone


@pytest.fixture(scope="module")
def small_fit(tmp_path_factory):
    """A ``fedilora fit`` run of one round (the checkpoint a Flower run resumes from), and its arguments."""
    root = tmp_path_factory.mktemp("lost")
    overrides = [*BASE_OVERRIDES, "--trainer.ranks=[8,4,2]", "--trainer.callbacks=[]", "--trainer.eval_every=5",
                 f"--trainer.root_dir={root}", "--trainer.name=lost"]  # fmt: skip
    fit_reference(root, "lost", [*overrides, "--trainer.rounds=1"])
    return root / "lost", overrides


@pytest.mark.parametrize(
    ("mode", "error", "message"),
    [
        ("silent", "AllClientsLost", r"round 1: every one of its 3 sampled clients was lost \(client 0: no train "
                                     r"reply within round-timeout=0.3 s\)"),
        ("gone", "SuperLinkLost", r"the SuperLink is gone or no longer serves this run \(pulling replies failed"),
    ],
)  # fmt: skip
def test_a_round_that_lost_every_client_or_its_superlink_is_never_saved(small_fit, mode, error, message):
    """The Flower server resumes the checkpoint of 1 round (written by ``fedilora fit``); in the next round
    (index 1) no node answers, or the SuperLink fails: the run stops with RunFailed, having saved the
    completed round again in its own folder and no checkpoint of the lost round anywhere (a resume then
    runs that round, rather than trust a round that did not run)."""
    from fedilora.errors import RunFailed
    from fedilora.flower.config import parse
    from fedilora.flower.server_app import FlowerTrainer

    runs, overrides = small_fit
    parsed = parse(str(ROOT / "configs" / "demo.yaml"), [*overrides, "--trainer.rounds=3"], trainer_class=FlowerTrainer)
    grid = SilentGrid(mode)
    parsed.trainer.connect(grid, 3, node_timeout=5, round_timeout=0.3)
    with pytest.raises(RunFailed, match=message) as stop:
        parsed.trainer.fit(parsed.model, parsed.datamodule, ckpt_path="last")
    assert type(stop.value).__name__ == error and grid.trains == 3  # round 2's TRAIN went out, nothing more
    saved = parsed.trainer.log_dir / "checkpoints" / "round-0001.ckpt"
    assert f"the last completed round (1) is saved in {saved}, no later one; restart the SuperLink" in str(stop.value)
    assert "every SuperNode (they exit by themselves" in str(stop.value)
    assert sorted(p.name for p in runs.rglob("round-*.ckpt")) == ["round-0001.ckpt"] * len(list(runs.iterdir()))
    state = torch.load(saved, weights_only=True, map_location="cpu")
    assert state["completed_rounds"] == 1 and len(state["history"]) == 1


def test_a_round_zero_that_lost_every_client_saves_nothing(flower_trainer_factory, tmp_path):
    from fedilora.flower.config import parse
    from fedilora.flower.server_app import AllClientsLost, FlowerTrainer

    args = [*BASE_OVERRIDES, "--trainer.ranks=[8,4,2]", "--trainer.callbacks=[]", f"--trainer.root_dir={tmp_path}"]
    parsed = parse(str(ROOT / "configs" / "demo.yaml"), args, trainer_class=FlowerTrainer)
    parsed.trainer.connect(SilentGrid("silent"), 3, node_timeout=5, round_timeout=0.2)
    with pytest.raises(AllClientsLost, match=r"round 0: every one of its 3 .*; no round had completed, nothing is"):
        parsed.trainer.fit(parsed.model, parsed.datamodule)
    assert not list(tmp_path.rglob("*.ckpt"))


def test_a_signal_stops_the_server_while_it_waits_for_replies(tmp_path):
    """Flower's ServerApp gets SIGINT when its SuperExec is gone; the trainer's handler only sets a flag,
    which the server checks while it waits for replies (its safe point) and stops, saving what completed."""
    from fedilora.client import Interrupted
    from fedilora.errors import RunFailed
    from fedilora.flower.config import parse
    from fedilora.flower.server_app import FlowerTrainer, Inbox

    inbox = Inbox(FakeGrid({}), stop=lambda: True)
    with pytest.raises(Interrupted):
        inbox.wait(1, time.monotonic() + 60)
    args = [*BASE_OVERRIDES, "--trainer.ranks=[8,4,2]", "--trainer.callbacks=[]", f"--trainer.root_dir={tmp_path}"]
    parsed = parse(str(ROOT / "configs" / "demo.yaml"), args, trainer_class=FlowerTrainer)
    grid = SilentGrid("silent")
    parsed.trainer.connect(grid, 3, node_timeout=5, round_timeout=600)
    pull = grid.pull_messages

    def pull_then_signal(message_ids):  # the signal comes while round 0's replies are awaited
        if grid.trains:
            os.kill(os.getpid(), signal.SIGINT)
        return pull(message_ids)

    grid.pull_messages = pull_then_signal
    started = time.monotonic()
    with pytest.raises(RunFailed, match=r"the ServerApp was stopped by SIGINT \(what it saved is printed above\)"):
        parsed.trainer.fit(parsed.model, parsed.datamodule)
    assert time.monotonic() - started < 60 and not list(tmp_path.rglob("*.ckpt"))  # not the 600 s round timeout


def test_a_resume_says_which_rounds_of_its_checkpoint_trained_no_client(caplog):
    from fedilora.checkpoint import FINGERPRINT_VERSION, check_resumable

    fingerprint = {"version": FINGERPRINT_VERSION, "config": {}, "data": None, "shapes": {}}
    history = [{"round": 0, "round/skipped": 0.0, "round/num_clients": 3.0},
               {"round": 1, "round/skipped": 1.0, "round/num_clients": 1.0},  # too few healthy: trained, refused
               {"round": 2, "round/skipped": 1.0, "round/num_clients": 0.0},  # nobody answered
               {"round": 3, "round/skipped": 1.0}]  # under DP without client figures: the count is not known
    state = {"fingerprint": fingerprint, "completed_rounds": 4, "history": history}
    with caplog.at_level("WARNING", logger="fedilora"):
        check_resumable(Path("round-0004.ckpt"), state, fingerprint, rounds=5)
    assert [r.getMessage() for r in caplog.records] == [
        "warning: --ckpt_path: round-0004.ckpt: 1 of its 4 rounds trained no client (round 2: every sampled client "
        "failed or was lost, the global model did not change); they count as done and are not run again; resume "
        "from a checkpoint written before them to run them"
    ]
    caplog.clear()
    check_resumable(Path("round-0001.ckpt"), {**state, "history": history[:2], "completed_rounds": 2}, fingerprint, 5)
    assert not caplog.records


# ------------------------------------------------------------------------------- end to end (slow)
BASE_OVERRIDES = [
    "--data.num_clients=3",
    "--trainer.clients_per_round=3",
    "--data.dataset.init_args.num_train=300",
    "--data.dataset.init_args.num_test=60",
    "--trainer.max_local_steps=2",
    "--trainer.progress=false",
    "--trainer.checkpoint_every=1",
    "--trainer.keep_last=10",
]


def fit_reference(root: Path, name: str, overrides: list[str], callbacks: list[str] = ()) -> Path:
    """``fedilora fit`` in this process; the run folder."""
    from fedilora.cli import FediLoRACLI

    args = ["fit", "--config", str(ROOT / "configs" / "demo.yaml"), *overrides]
    args += [f"--trainer.root_dir={root}", f"--trainer.name={name}", *callbacks]
    FediLoRACLI(args=args)
    return root / name / "version_0"


def load(run: Path, rounds: int) -> dict:
    return torch.load(run / "checkpoints" / f"round-{rounds:04d}.ckpt", weights_only=True, map_location="cpu")


def assert_same_states(a: dict, b: dict) -> None:
    for part in ("global_lora", "global_extra"):
        assert a[part].keys() == b[part].keys()
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}/{key} differs"


def assert_same_history(a: list[dict], b: list[dict], skip=lambda key: False) -> None:
    assert len(a) == len(b)
    for ra, rb in zip(a, b, strict=True):
        keys = {k for k in ra if k != "round/time_s" and not skip(k)}
        # Flower's own figures (client runtime builds) come on top of fedilora's
        assert keys == {k for k in rb if k != "round/time_s" and not k.startswith("flower/") and not skip(k)}
        for key in keys:
            assert ra[key] == rb[key] or (math.isnan(ra[key]) and math.isnan(rb[key])), (
                ra["round"],
                key,
                ra[key],
                rb[key],
            )


@pytest.fixture
def federation(tmp_path):
    fed = Federation(tmp_path / "flower", simulation=False, cwd=ROOT)
    fed.env["FEDILORA_FLOWER_THREADS"] = str(torch.get_num_threads())
    fed.env["FEDILORA_CACHE_DIR"] = os.environ["FEDILORA_CACHE_DIR"]
    yield fed
    fed.close()
    for process in fed.processes:  # nothing this test started is left running
        assert not process.group_alive(), f"{process.name}: process group {process.pid} still has processes"


@pytest.mark.slow
def test_simulation_equals_fedilora_fit_across_a_server_restart(federation, tmp_path):
    """3 clients of ranks 8/4/2, FediLoRA with model editing, on the Flower simulation engine: a first
    run stops after round 1; a new run (a new ServerApp process) resumes from its checkpoint
    (``ckpt-path``) and does round 2. Global adapter, head, personalized states and every logged metric
    equal those of one uninterrupted ``fedilora fit`` run, bit for bit."""
    overrides = [*BASE_OVERRIDES, "--trainer.ranks=[8,4,2]", "--trainer.eval_every=1"]
    fit = fit_reference(tmp_path / "runs", "fit", [*overrides, "--trainer.rounds=2"])
    federation.simulation = True
    federation.start_superlink()
    flower_overrides = [*overrides, f"--trainer.root_dir={tmp_path / 'runs'}", "--trainer.name=sim"]
    simulation = "num-supernodes=3 client-resources-num-cpus=2"
    first = {"config": "configs/demo.yaml", "overrides": " ".join([*flower_overrides, "--trainer.rounds=1"])}
    federation.run(APP, first, simulation, timeout=900)
    second = {**first, "overrides": " ".join([*flower_overrides, "--trainer.rounds=2"]), "ckpt-path": "last"}
    federation.run(APP, second, simulation, timeout=900)
    runs = tmp_path / "runs" / "sim"
    assert_same_states(load(fit, 1), load(runs / "version_0", 1))
    a, b = load(fit, 2), load(runs / "version_1", 2)  # the resumed run writes a new version folder
    assert_same_states(a, b)
    for client in range(3):
        for part in ("lora", "extra"):
            for key, value in a["personal"][str(client)][part].items():
                assert torch.equal(value, b["personal"][str(client)][part][key])
    assert_same_history(a["history"], b["history"])
    assert b["history"][-1]["personalized/num_clients"] == 3.0
    for name in ("results.json", "config.yaml", "missing_masks.safetensors"):
        assert (runs / "version_1" / name).is_file()
    assert list((runs / "version_1").glob("events.out.tfevents.*"))  # TensorBoard logs


@pytest.mark.slow
def test_failed_run_is_reported(federation, monkeypatch, capsys):
    """``flwr run`` exits 0 when the ServerApp fails; ``Federation.run`` reads the run's status instead,
    and the failure names the bad option."""
    federation.start_superlink()
    with pytest.raises(FlowerRunError, match=r"finished:failed.*trainer.rounds: must be >= 1"):
        federation.run(APP, {"config": "configs/demo.yaml", "overrides": "--trainer.rounds=0"}, timeout=300)
    # the command for users: same check, exit status 1 and the reason on stderr
    from fedilora.flower.__main__ import main

    monkeypatch.setenv("FLWR_HOME", str(federation.home))
    monkeypatch.chdir(ROOT)
    assert main(["run", str(APP), "fedilora", "-c", 'overrides="--trainer.max_local_steps=0"']) == 1
    assert "trainer.max_local_steps: must be >= 1 or null, got 0" in capsys.readouterr().err


class FailFrom(FederatedCallback):
    """Client ``client`` raises from round ``round`` on: ``fedilora fit``'s picture of a node lost mid-round."""

    def __init__(self, client: int, round: int) -> None:
        self.client, self.round = client, round

    def on_client_fit_start(self, trainer, round: int, client_id: int, rank: int) -> None:
        if client_id == self.client and round >= self.round:
            raise RuntimeError(f"client {client_id} lost in round {round}")


@pytest.mark.slow
def test_deployment_equals_fit_and_leaves_a_killed_client_out(federation, tmp_path):
    """FLoRA (base merge every round) with a SuperLink and 3 SuperNodes (ranks 8/4/2 from their node
    config, keep-alive workers) on 127.0.0.1. Client 2's SuperNode is killed (SIGKILL, its whole process
    group) while round 1 trains: it is left out of round 1 exactly as a client that fails there is in
    ``fedilora fit``, and the global state equals that run's bit for bit after each round."""
    overrides = [
        *BASE_OVERRIDES,
        "--trainer.rounds=2",
        "--trainer.ranks=[8,4,2]",
        "--trainer.eval_every=2",
        "--trainer.aggregator=FLoRA",
        "--trainer.callbacks=[]",
    ]
    failing = f'--trainer.callbacks=[{{"class_path": "{__name__}.FailFrom", "init_args": {{"client": 2, "round": 1}}}}]'
    fit = fit_reference(tmp_path / "runs", "fit", overrides, [failing])
    federation.start_superlink()
    nodes = [
        federation.add_supernode({"partition-id": k, "rank": r, "keep-alive": 300.0}, f"node{k}")
        for k, r in enumerate([8, 4, 2])
    ]
    flower_overrides = " ".join([*overrides, f"--trainer.root_dir={tmp_path / 'runs'}", "--trainer.name=deploy"])
    run_id = federation.submit(APP, {"config": "configs/demo.yaml", "overrides": flower_overrides})
    victim = nodes[2]
    deadline = time.monotonic() + 600
    while victim.tail(10**6).count("Receiving: train message") < 2:  # round 1 reached client 2's node
        assert time.monotonic() < deadline, victim.tail()
        time.sleep(0.05)
    victim.signal_group(signal.SIGKILL)
    killed = time.monotonic()
    federation.wait(run_id, timeout=900)
    print(f"the run ended {time.monotonic() - killed:.0f} s after the kill")
    deploy = tmp_path / "runs" / "deploy" / "version_0"
    for rounds in (1, 2):
        assert_same_states(load(fit, rounds), load(deploy, rounds))
    a, b = load(fit, 2), load(deploy, 2)
    assert [h["round/rejected_updates"] for h in b["history"]] == [0.0, 1.0]
    # the lost node's personalized model cannot be evaluated on its own data: 2 clients instead of 3
    lost = ("personalized/mean", "personalized/client_2", "personalized/num_clients")
    assert_same_history(a["history"], b["history"], skip=lambda key: key.startswith(lost))
    assert (a["history"][-1]["personalized/num_clients"], b["history"][-1]["personalized/num_clients"]) == (3.0, 2.0)
    assert "client 2 left out of the aggregation" in federation.logs(run_id)


def _serverapps(federation) -> list[int]:
    """The live ``flwr-serverapp`` processes of ``federation`` (Flower starts them detached, in a session
    of their own under its SuperExec: they are not in the SuperLink's process group)."""
    mine = f"FLWR_HOME={federation.home}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if b"flwr-serverapp" in (proc / "cmdline").read_bytes() and mine in (proc / "environ").read_bytes():
                found.append(int(proc.name))
        except (OSError, ValueError):
            continue
    return found


@pytest.mark.slow
def test_a_serverapp_whose_superlink_is_killed_stops_and_saves_no_later_round(federation, tmp_path):
    """A SuperLink killed (SIGKILL, itself only) while round 1 trains on 3 SuperNodes: its ServerApp,
    left behind, ends by itself (it used to outlive its SuperLink for good, retrying the link); the run
    folder holds the checkpoint of the completed round and none of a round it could not run."""
    runs = tmp_path / "runs"
    overrides = [*BASE_OVERRIDES, "--trainer.rounds=3", "--trainer.ranks=[8,4,2]", "--trainer.eval_every=5",
                 "--trainer.callbacks=[]", f"--trainer.root_dir={runs}", "--trainer.name=killed"]  # fmt: skip
    link = federation.start_superlink()
    nodes = [
        federation.add_supernode({"partition-id": k, "rank": r, "keep-alive": 300.0}, f"node{k}")
        for k, r in enumerate([8, 4, 2])
    ]
    federation.submit(APP, {"config": "configs/demo.yaml", "overrides": " ".join(overrides), "link-timeout": 5.0})
    deadline = time.monotonic() + 600
    while nodes[0].tail(10**6).count("Receiving: train message") < 2:  # round 1 reached the nodes
        assert time.monotonic() < deadline, nodes[0].tail()
        time.sleep(0.05)
    server = _serverapps(federation)
    assert len(server) == 1
    os.kill(link.pid, signal.SIGKILL)
    killed = time.monotonic()
    try:
        while _serverapps(federation):
            assert time.monotonic() - killed < 90, "the ServerApp outlived its SuperLink"
            time.sleep(0.2)
    finally:
        for pid in _serverapps(federation):  # what this test started: never left running
            os.kill(pid, signal.SIGKILL)
    print(f"the ServerApp ended {time.monotonic() - killed:.1f} s after its SuperLink was killed")
    assert sorted(p.name for p in (runs / "killed").rglob("*.ckpt")) == ["round-0001.ckpt"]
