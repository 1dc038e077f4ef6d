"""aiolm.engine.multimodal.vision_batches: a pass's items cut into vision-tower calls."""

from __future__ import annotations

import pytest

from aiolm.engine.multimodal import vision_batches


@pytest.mark.parametrize(("sizes", "limit", "expected"), [
    ([], 10, []),
    ([3, 3, 3], 10, [(0, 3)]),
    ([3, 3, 3], 6, [(0, 2), (2, 3)]),
    ([12, 2, 2], 10, [(0, 1), (1, 3)]),      # an item past the limit goes alone
    ([2, 12, 2], 10, [(0, 1), (1, 2), (2, 3)]),
    ([5, 5, 5, 5], 5, [(0, 1), (1, 2), (2, 3), (3, 4)]),
])
def test_runs_stay_within_the_limit(sizes, limit, expected):
    runs = vision_batches(sizes, limit)
    assert [(r.start, r.stop) for r in runs] == expected
