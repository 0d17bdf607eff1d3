import pytest
import torch

from fedilora.editing import ModelEditing, edit_layers, layer_similarities
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
     ({"num_edits": -1}, "ModelEditing.num_edits"), ({"threshold": 2.0}, "ModelEditing.threshold")],
)  # fmt: skip
def test_bad_editing_options(kwargs, option):
    with pytest.raises(ConfigError, match=option):
        ModelEditing(**kwargs)
