"""Asset-check rules on small frames."""

import pandas as pd

from automl_assets import checks
from tests.conftest import utc


def test_eligibility_counts_the_newest_snapshot_that_calibration_is_fitted_on():
    """Twelve stacked snapshots with 394 positives in all, 34 of them in the newest: the calibrator would be fitted
    on a handful of held-out positives, so training is blocked before it starts, saying why."""
    snapshots = [pd.DataFrame({"snapshot": k, "label": [1] * (34 if k == 0 else 33) + [0] * 966}) for k in range(12)]
    train = pd.concat(snapshots, ignore_index=True)
    start = utc(2026, 1, 1)
    result = checks.training_eligibility(train, start, start)
    assert not result.passed
    assert "The newest training snapshot (1000 users" in result.description and "has 34 positives and 966 negatives" in result.description
    enough = pd.concat([train[train["snapshot"] > 0], pd.DataFrame({"snapshot": 0, "label": [1] * 100 + [0] * 900})])
    assert checks.training_eligibility(enough, start, start).passed
