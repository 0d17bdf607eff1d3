import pytest
import torch

from fedilora.editing import ModelEditing, edit_counts, edit_layers, layer_similarities, outlier_scores
from fedilora.errors import ConfigError


def _pair():
    received = {
        "a.lora_A.weight": torch.tensor([[1.0, 0.0], [0.0, 1.0]]),
        "b.lora_A.weight": torch.tensor([[1.0, 1.0], [1.0, 1.0]]),
        "a.lora_B.weight": torch.tensor([[1.0, 2.0]]),
    }
    local = {
        "a.lora_A.weight": torch.tensor([[1.0, 0.0], [0.0, 0.9]]),  # nearly the same direction
        "b.lora_A.weight": torch.tensor([[1.0, 0.0], [0.0, 1.0]]),  # cos = 2 / (sqrt(2) * 2) = 0.7071
        "a.lora_B.weight": torch.tensor([[-1.0, -2.0]]),  # opposite: cos = -1
    }
    return local, received


def test_least_similar_lora_a_is_blended_with_its_similarity():
    local, received = _pair()
    edited, report = edit_layers(local, received, keys="lora_A", num_edits=1, threshold=0.95)
    s = 2**-0.5
    assert report.similarities["b.lora_A.weight"] == pytest.approx(s)
    assert list(report.edited) == ["b.lora_A.weight"]
    expected = s * local["b.lora_A.weight"] + (1 - s) * received["b.lora_A.weight"]
    torch.testing.assert_close(edited["b.lora_A.weight"], expected)
    assert edited["a.lora_A.weight"] is local["a.lora_A.weight"]
    assert edited["a.lora_B.weight"] is local["a.lora_B.weight"]  # B is not a candidate with keys=lora_A


def test_nothing_changes_above_threshold():
    local, received = _pair()
    edited, report = edit_layers(local, received, keys="lora_A", num_edits=2, threshold=0.5)
    # both A similarities (0.99.., 0.707) are >= 0.5
    assert report.edited == {}
    for key in local:
        assert torch.equal(edited[key], local[key])


def test_num_edits_bounds_the_number_of_edited_matrices():
    local, received = _pair()
    _, one = edit_layers(local, received, keys="all", num_edits=1, threshold=1.0)
    _, two = edit_layers(local, received, keys="all", num_edits=2, threshold=1.0)
    _, none = edit_layers(local, received, keys="all", num_edits=0, threshold=1.0)
    assert list(one.edited) == ["a.lora_B.weight"]  # the lowest similarity (-1) goes first
    assert set(two.edited) == {"a.lora_B.weight", "b.lora_A.weight"}
    assert none.edited == {}


def test_key_filter():
    local, received = _pair()
    assert set(layer_similarities(local, received, "lora_A")) == {"a.lora_A.weight", "b.lora_A.weight"}
    assert set(layer_similarities(local, received, "lora_B")) == {"a.lora_B.weight"}
    assert set(layer_similarities(local, received, "all")) == set(local)


@pytest.mark.parametrize(("blend", "lam"), [("similarity", 0.0), ("half", 0.5), ("replace", 0.0)])
def test_blend_modes(blend, lam):
    local, received = _pair()
    edited, report = edit_layers(local, received, keys="lora_B", num_edits=1, threshold=0.95, blend=blend)
    # similarity -1 clamps to lam = 0 in `similarity` mode
    assert report.edited["a.lora_B.weight"] == pytest.approx(lam)
    expected = lam * local["a.lora_B.weight"] + (1 - lam) * received["a.lora_B.weight"]
    torch.testing.assert_close(edited["a.lora_B.weight"], expected)


def test_callback_skips_round_zero_and_edits_the_upload_later():
    from fedilora.aggregation import ClientUpdate

    local, received = _pair()
    callback = ModelEditing(keys="lora_A", num_edits=1, threshold=0.95)
    update = ClientUpdate(0, 2, 10, dict(local), {})
    callback.on_client_fit_end(trainer=None, round=0, update=update, received=received)
    assert torch.equal(update.lora["b.lora_A.weight"], local["b.lora_A.weight"])
    callback.on_client_fit_end(trainer=None, round=1, update=update, received=received)
    assert not torch.equal(update.lora["b.lora_A.weight"], local["b.lora_A.weight"])
    assert update.metrics["edits"] == 1.0


@pytest.mark.parametrize(
    ("kwargs", "option"),
    [({"keys": "lora_C"}, "ModelEditing.keys"), ({"blend": "mix"}, "ModelEditing.blend"),
     ({"num_edits": -1}, "ModelEditing.num_edits"), ({"threshold": 2.0}, "ModelEditing.threshold"),
     ({"criterion": "zscore"}, "ModelEditing.criterion"), ({"z_threshold": -1.0}, "ModelEditing.z_threshold")],
)  # fmt: skip
def test_bad_editing_options(kwargs, option):
    with pytest.raises(ConfigError, match=option):
        ModelEditing(**kwargs)


def _near_global(similar_offsets):
    """Six 1x2 lora_A matrices: global (1, 0), local (1, e) with cos = 1 / sqrt(1 + e^2), all above 0.95."""
    received = {f"m{i}.lora_A.weight": torch.tensor([[1.0, 0.0]], dtype=torch.float64) for i in range(6)}
    local = {k: torch.tensor([[1.0, e]], dtype=torch.float64) for k, e in zip(received, similar_offsets, strict=True)}
    return local, received


def test_outlier_criterion_edits_where_the_absolute_threshold_never_fires():
    # every similarity is above 0.995; m5 moved 10x further than the others
    local, received = _near_global([0.010, 0.011, 0.009, 0.010, 0.012, 0.1])
    _, paper = edit_layers(local, received, num_edits=1, threshold=0.95)
    assert paper.edited == {}
    edited, report = edit_layers(local, received, num_edits=2, criterion="outlier", z_threshold=3.0, blend="median")
    assert list(report.edited) == ["m5.lora_A.weight"]  # only the outlier, although num_edits allows 2
    s = report.similarities
    median = sorted(s.values())[2:4]  # even count: torch's median is the lower middle value
    lam = (1 - median[0]) / (1 - s["m5.lora_A.weight"])
    assert report.edited["m5.lora_A.weight"] == pytest.approx(lam)
    assert 0 < lam < 0.05  # (1 - cos) grows as e^2: a 10x larger offset gives ~1/100
    expected = lam * local["m5.lora_A.weight"] + (1 - lam) * received["m5.lora_A.weight"]
    torch.testing.assert_close(edited["m5.lora_A.weight"], expected)


def test_outlier_scores_are_scale_free_and_zero_without_spread():
    sims = {"a": 0.99, "b": 0.98, "c": 0.97, "d": 0.5}
    scaled = {k: 1 - 0.01 * (1 - v) for k, v in sims.items()}  # same ranks, all within 0.005 of 1
    for key, z in outlier_scores(sims).items():
        assert outlier_scores(scaled)[key] == pytest.approx(z)
    # hand value: median (torch: lower middle) 0.97, MAD median(|.02, .01, 0, .47|) = 0.01
    assert outlier_scores(sims)["d"] == pytest.approx((0.5 - 0.97) / (1.4826 * 0.01))
    assert outlier_scores({"a": 0.9, "b": 0.9, "c": 0.9}) == {"a": 0.0, "b": 0.0, "c": 0.0}


def test_edit_counts_from_history():
    history = [
        {"round": 0},
        {"round": 1, "edit/num_edited": 0.0, "edit/clients_edited": 0.0, "edit/similarity_min": 0.97,
         "edit/similarity_mean": 0.99},
        {"round": 2, "edit/num_edited": 3.0, "edit/clients_edited": 2.0, "edit/similarity_min": 0.9,
         "edit/similarity_mean": 0.97},
    ]  # fmt: skip
    counts = edit_counts(history)
    assert counts["total"] == 3 and counts["rounds_with_edits"] == 1 and counts["rounds_eligible"] == 2
    assert counts["clients_edited"] == 2 and counts["per_round"] == [0, 3]
    assert counts["similarity_min"] == 0.9 and counts["similarity_mean"] == pytest.approx(0.98)


def test_a_run_without_edits_says_so(capsys):
    class _Fabric:
        print = staticmethod(print)

    class _Trainer:
        fabric = _Fabric()

        def __init__(self):
            self.history = [
                {"round": 1, "edit/num_edited": 0.0, "edit/similarity_min": 0.985, "edit/similarity_mean": 0.99}
            ]

    results = {}
    ModelEditing(threshold=0.95).on_fit_end(trainer=_Trainer(), results=results)
    out = capsys.readouterr().out
    assert results["edits"]["total"] == 0
    assert "warning: ModelEditing is on but made 0 edits in 1 round(s)" in out and "0.9850" in out
