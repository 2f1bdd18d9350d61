import dataclasses
import json
import math

import numpy as np
import pytest
from scipy.special import expit, logit

from automl_assets.core.calibration import Calibrator, fit_calibrator
from automl_assets.core.metrics import (
    auc,
    auc_difference,
    brier,
    expected_calibration_error,
    log_loss,
    reliability_table,
    summarise,
)


def miscalibrated(n: int, seed: int):
    """True probability sigmoid(2x), model score sigmoid(x + 1): too flat and shifted up."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n)
    label = (rng.random(n) < expit(2 * x)).astype(int)
    return expit(x + 1), label


def test_auc_is_nan_for_a_single_class_and_exact_otherwise():
    assert math.isnan(auc([0, 0, 0], [0.1, 0.5, 0.9]))
    assert auc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0
    assert auc([0, 1, 0, 1], [0.1, 0.2, 0.3, 0.4]) == 0.75


def delong_by_definition(y, p, q):
    """DeLong's paired test from its definition: every (positive, negative) pair, ties counting half."""

    def components(score):
        positive, negative = score[y == 1][:, None], score[y == 0][None, :]
        wins = (positive > negative) + 0.5 * (positive == negative)
        return wins.mean(axis=1), wins.mean(axis=0)  # per positive, per negative

    (p_positive, p_negative), (q_positive, q_negative) = components(p), components(q)
    variance = np.var(p_positive - q_positive, ddof=1) / len(p_positive) + np.var(p_negative - q_negative, ddof=1) / len(
        p_negative
    )
    return p_positive.mean() - q_positive.mean(), math.sqrt(variance)


def test_auc_difference_is_delongs_paired_test():
    rng = np.random.default_rng(4)
    y = (rng.random(300) < 0.3).astype(int)
    p = np.round(y + rng.normal(size=300), 1)  # rounded: ties within and across classes
    q = np.round(0.5 * y + rng.normal(size=300), 1)
    result = auc_difference(y, p, q)
    difference, error = delong_by_definition(y, p, q)
    assert result["difference"] == pytest.approx(auc(y, p) - auc(y, q), abs=1e-12)
    assert result["difference"] == pytest.approx(difference, abs=1e-12)
    assert result["standard_error"] == pytest.approx(error, rel=1e-9)
    assert result["low"] == pytest.approx(difference - 1.96 * error) and result["high"] == pytest.approx(difference + 1.96 * error)
    assert auc_difference(y, p, p) == {"difference": 0.0, "standard_error": 0.0, "low": 0.0, "high": 0.0}
    # A within-class covariance needs two of each: one positive gave a NaN error and interval.
    for labels in (np.zeros(5), np.array([1, 0, 0, 0, 0])):
        with pytest.raises(ValueError, match="two labels of each class"):
            auc_difference(labels, p[:5], q[:5])


def test_log_loss_clips_and_brier_is_the_mean_squared_error():
    assert log_loss([1, 0], [0.0, 1.0]) == pytest.approx(-math.log(1e-15), rel=1e-4)
    assert log_loss([1, 0], [0.8, 0.4]) == pytest.approx(-(math.log(0.8) + math.log(0.6)) / 2)
    assert brier([1, 0, 1], [0.5, 0.5, 1.0]) == pytest.approx((0.25 + 0.25 + 0) / 3)
    with pytest.raises(ValueError, match="differ in length"):
        brier([1, 0], [0.5])


def test_reliability_table_uses_equal_mass_bins():
    rng = np.random.default_rng(1)
    p = rng.beta(0.5, 8, size=1003)  # crowded near 0, as conversion scores are
    table = reliability_table(rng.random(1003) < p, p, bins=10)
    assert list(table.columns) == ["bin", "mean_pred", "mean_obs", "count"]
    assert list(table["bin"]) == list(range(10))
    assert table["count"].sum() == 1003 and table["count"].max() - table["count"].min() <= 1
    assert table["mean_pred"].is_monotonic_increasing
    # fewer rows than bins: one row per bin
    assert list(reliability_table([0, 1, 1], [0.9, 0.1, 0.5], bins=10)["count"]) == [1, 1, 1]


def test_ece_is_the_count_weighted_gap():
    # two bins of two: predictions 0.1 (observed 0.5) and 0.8 (observed 1.0)
    assert expected_calibration_error([0, 1, 1, 1], [0.1, 0.1, 0.8, 0.8], bins=2) == pytest.approx((0.4 + 0.2) / 2)
    rng = np.random.default_rng(2)
    p = rng.random(50_000)
    assert expected_calibration_error(rng.random(50_000) < p, p) < 0.01


def test_equal_predictions_share_a_bin_whatever_the_row_order():
    """A constant prediction at the observed rate is calibrated, however its labels are ordered."""
    labels = np.r_[np.zeros(700), np.ones(300)]
    assert expected_calibration_error(labels, np.full(1000, 0.3)) == pytest.approx(0)
    assert expected_calibration_error(labels[::-1], np.full(1000, 0.3)) == pytest.approx(0)
    tied = np.r_[np.full(500, 0.2), np.linspace(0.5, 0.9, 500)]
    assert reliability_table(np.zeros(1000), tied, bins=10)["count"].iloc[0] == 500


def test_summarise_reports_every_metric():
    y, p = [0, 1, 1, 0], [0.2, 0.7, 0.6, 0.4]
    summary = summarise(y, p)
    assert set(summary) == {"auc", "log_loss", "brier", "ece", "positives", "n"}
    assert summary["positives"] == 2 and summary["n"] == 4 and summary["auc"] == 1.0


def test_calibration_lowers_ece_on_fresh_data():
    calibrator = fit_calibrator(*miscalibrated(5000, seed=0))
    raw, label = miscalibrated(20_000, seed=1)
    before = expected_calibration_error(label, raw)
    after = expected_calibration_error(label, calibrator.predict(raw))
    assert before > 0.15 and after < 0.03
    assert log_loss(label, calibrator.predict(raw)) < log_loss(label, raw)


def test_output_is_monotone_and_strictly_inside_0_1_everywhere():
    calibrator = fit_calibrator(*miscalibrated(3000, seed=3))
    grid = np.concatenate([[0.0], np.logspace(-12, -1, 200), np.linspace(0, 1, 20_001), 1 - np.logspace(-1, -12, 200), [1.0]])
    grid.sort()
    calibrated = calibrator.predict(grid)
    assert np.all(np.diff(calibrated) >= 0)
    low, high = calibrator.bounds
    assert low == 1 / 3002 and high == 1 - 1 / 3002
    assert calibrated.min() >= low and calibrated.max() <= high


def test_out_of_range_scores_follow_platt_not_the_isotonic_ends():
    raw, label = miscalibrated(4000, seed=4)
    inside = (raw > 0.3) & (raw < 0.9)  # a fitted range narrower than the scores seen later
    calibrator = fit_calibrator(raw[inside], label[inside])
    for outside in (np.array([0.1, 0.15, 0.2, 0.25]), np.array([0.92, 0.95, 0.97])):
        calibrated = calibrator.predict(outside)
        assert np.ptp(calibrator.isotonic(outside)) == 0  # isotonic alone: one flat value for all of them
        assert np.all((calibrated > 0) & (calibrated < 1))
        assert np.all(np.diff(calibrated) > 0)  # the calibrator keeps ranking them...
        # ...along the Platt curve: a constant shift in logit space (the anchor at the fitted range's end); these
        # values are far enough from 0 and 1 for the bounds to leave them as they are
        low, high = calibrator.bounds
        assert np.all((calibrated > 2 * low) & (calibrated < 1 - 2 * low))
        shift = logit(calibrated) - logit(calibrator.platt(outside))
        assert np.ptp(shift) < 1e-9 and abs(shift[0]) < 0.5
    assert calibrator.isotonic([0.1, 0.97]).tolist() == [0.0, 1.0]  # the extremes it would otherwise have given


def test_round_trip_through_json_predicts_identically():
    calibrator = fit_calibrator(*miscalibrated(2000, seed=5))
    restored = Calibrator.from_dict(json.loads(json.dumps(calibrator.to_dict())))
    raw = np.linspace(0, 1, 5001)
    np.testing.assert_array_equal(restored.predict(raw), calibrator.predict(raw))


def test_few_points_fall_back_mostly_to_platt():
    calibrator = fit_calibrator(*miscalibrated(30, seed=6), min_support=50)
    raw = np.linspace(0.2, 0.95, 100)
    assert calibrator.support_weight(raw).max() <= 30 / 50
    calibrated = calibrator.predict(raw)
    assert np.abs(calibrated - calibrator.platt(raw)).mean() < 0.5 * np.abs(calibrated - calibrator.isotonic(raw)).mean()


def test_well_supported_steps_follow_isotonic():
    raw, label = miscalibrated(20_000, seed=7)
    calibrator = fit_calibrator(raw, label, min_support=50)
    middle = np.linspace(0.3, 0.95, 500)
    trusted = calibrator.support_weight(middle) == 1.0
    assert trusted.mean() > 0.9
    np.testing.assert_allclose(calibrator.predict(middle)[trusted], calibrator.isotonic(middle)[trusted], atol=1e-3)


def test_many_users_tied_at_an_end_score_get_their_measured_rate():
    """60% of users share the lowest raw score (no activity: one feature vector) and buy at 1%: their isotonic step
    is measured on thousands of them, so they get that rate, not the Platt curve's extrapolation (1.4% here). A lone
    user at an end still hands over to Platt."""
    rng = np.random.default_rng(0)

    def sample(n):
        inactive = rng.random(n) < 0.6
        raw = np.where(inactive, 0.30, rng.uniform(0.31, 0.95, n))
        rate = np.where(inactive, 0.01, 0.05 + 0.5 * (raw - 0.31))
        return raw, (rng.random(n) < rate).astype(int), inactive

    raw, label, inactive = sample(20000)
    calibrator = fit_calibrator(raw, label)
    assert calibrator.support_weight(0.30) == 1.0
    fresh_raw, fresh_label, fresh_inactive = sample(200000)
    assert calibrator.predict(np.array([0.30]))[0] == pytest.approx(fresh_label[fresh_inactive].mean(), abs=0.001)
    assert calibrator.support_weight(raw.max()) < 0.1  # one user at the top end


def test_calibration_keeps_the_models_ranking():
    raw, label = miscalibrated(5000, seed=8)
    calibrator = fit_calibrator(raw, label)
    grid = np.linspace(raw.min(), raw.max(), 20_001)
    assert np.all(np.diff(calibrator.predict(grid)) > 0)  # isotonic alone is flat within each step
    assert np.ptp(calibrator.isotonic(grid)) > 0 and (np.diff(calibrator.isotonic(grid)) == 0).mean() > 0.5
    fresh_raw, fresh_label = miscalibrated(20_000, seed=9)
    assert auc(fresh_label, calibrator.predict(fresh_raw)) == pytest.approx(auc(fresh_label, fresh_raw), abs=1e-12)


def test_bounds_never_tie_users_when_nearly_everyone_converts():
    rng = np.random.default_rng(10)
    raw = rng.uniform(0.5, 1.0, 400)
    label = (rng.random(400) < 0.9 + 0.198 * (raw - 0.5)).astype(int)  # 90-99.8% convert: values crowd the top
    calibrator = fit_calibrator(raw, label)
    calibrated = calibrator.predict(np.sort(raw))
    low, high = calibrator.bounds
    assert calibrated.max() <= high and calibrated.min() >= low
    assert np.all(np.diff(calibrated) > 0)


def test_the_bounds_leave_a_rare_outcomes_probabilities_as_they_are():
    """Few held-out users and a rare outcome (5%): the bounds must not lift every small probability by most of a
    margin (one linear map of [0, 1] onto them did: the mean by 0.9 margins here); only values within two margins of
    0 or 1 move, and those stay strictly increasing inside the bounds."""
    rng = np.random.default_rng(12)
    raw = rng.uniform(0, 0.1, 300)
    calibrator = fit_calibrator(raw, (rng.random(300) < raw).astype(int))
    unbounded = dataclasses.replace(calibrator, n_fit=10**12)  # the same curve, with bounds a trillionth from 0 and 1
    margin = calibrator.bounds[0]
    fresh = np.sort(rng.uniform(0, 0.1, 100_000))
    bounded, curve = calibrator.predict(fresh), unbounded.predict(fresh)
    supported = (curve >= 2 * margin) & (curve <= 1 - 2 * margin)
    assert 0.9 < supported.mean() < 1  # some users fall within two margins of 0
    np.testing.assert_allclose(bounded[supported], curve[supported], rtol=1e-12)
    assert bounded.min() >= margin and np.all(bounded[~supported] <= 2 * margin)
    assert np.all(np.diff(bounded)[np.diff(curve) > 0] > 0)
    assert abs(bounded.mean() - curve.mean()) < 0.01 * margin


def test_fit_needs_both_classes():
    with pytest.raises(ValueError, match="both classes"):
        fit_calibrator(np.linspace(0, 1, 100), np.zeros(100))


def test_an_aging_population_keeps_honest_probabilities_out_of_time():
    """Fit on one window; score a later population whose raw scores drifted upward past the fitted range (users
    grew more active). The true relation is unchanged, so a calibrator that holds out of time stays close to the
    truth where plain isotonic regression pins every drifted user to its last step."""
    rng = np.random.default_rng(11)
    x_fit = rng.normal(size=3000)
    fit_label = (rng.random(3000) < expit(2 * x_fit - 1)).astype(int)
    calibrator = fit_calibrator(expit(x_fit), fit_label)
    x_later = rng.normal(loc=2.0, size=3000)  # the population a week on
    later_label = (rng.random(3000) < expit(2 * x_later - 1)).astype(int)
    raw_later = expit(x_later)
    assert (raw_later > max(expit(x_fit))).sum() > 100  # many scores lie beyond the fitted range
    blended = calibrator.predict(raw_later)
    plain_isotonic = np.clip(calibrator.isotonic(raw_later), 1e-15, 1 - 1e-15)
    low, high = calibrator.bounds
    assert blended.min() >= low and blended.max() <= high
    assert log_loss(later_label, blended) < log_loss(later_label, plain_isotonic)
    assert expected_calibration_error(later_label, blended) < 0.05
