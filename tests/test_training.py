"""Training has one code path: plain cross-entropy is the `none` objective, picked by name like every defence."""

import pytest
import torch
import torch.nn.functional as F

from splitleak.model import objectives, zoo


def objective_on_resnet20(name: str) -> tuple[torch.nn.Sequential, objectives.Objective]:
    torch.manual_seed(0)
    model = zoo.build("resnet20", num_classes=10)
    knobs = {"label_smoothing": 0.1, "mean": torch.full((3,), 0.5), "std": torch.full((3,), 0.25)}
    split = None if name == "none" else "layer1"
    return model, objectives.build(name, model, split=split, strength=0.0, input_shape=(3, 32, 32), **knobs)


@pytest.mark.parametrize("name", list(objectives.OBJECTIVES))
def test_every_objective_at_strength_zero_is_plain_cross_entropy_on_a_batch(name):
    model, objective = objective_on_resnet20(name)
    x, labels = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    loss, logged = objective(x, labels)
    assert torch.equal(loss, F.cross_entropy(model(x), labels, label_smoothing=0.1))
    assert (logged == {}) == (name == "none")  # a defence logs its own term, even at no weight


def test_an_unknown_objective_is_refused_with_the_names_there_are():
    with pytest.raises(KeyError, match="none, nopeek, adversarial"):
        objective_on_resnet20("dropout")
