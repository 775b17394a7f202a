"""The evaluation command's scoring (client/evaluate.py): the course's Dice on known cases."""

import pytest

from client.evaluate import dice_score


@pytest.mark.parametrize("truth,predicted,expected", [
    (["cat", "cat", "remote"], ["cat", "cat", "remote"], 1.0),
    (["cat", "cat", "remote"], ["remote", "cat", "cat"], 1.0),
    (["cat", "cat"], ["cat"], 2 / 3),
    (["cat"], ["cat", "cat", "cat"], 0.5),
    (["person", "boat"], ["dog"], 0.0),
    (["person"], [], 0.0),
    ([], ["person"], 0.0),
    ([], [], 1.0),
    (["a", "b", "b", "c"], ["b", "b", "b", "c", "d"], 2 * 3 / 9),
])
def test_dice_score(truth, predicted, expected):
    assert dice_score(truth, predicted) == pytest.approx(expected)
