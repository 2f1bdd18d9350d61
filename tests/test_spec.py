from pathlib import Path

import pytest

from automl_assets.core.spec import SpecError, load_spec, parse_spec

SAMPLE = Path(__file__).resolve().parent.parent / "predictions" / "purchase_7d.yaml"


def test_sample_spec_loads_with_defaults():
    spec = load_spec(SAMPLE)
    assert spec.name == "purchase_7d" and spec.outcome.event == "purchase"
    assert spec.lookback_weeks == 8 and spec.max_training_users == 250_000
    assert spec.retrain_delta.days == 1  # weekly horizon -> daily retrain, shorter than the feature window


def test_every_problem_is_listed_with_its_field():
    with pytest.raises(SpecError) as error:
        parse_spec({"name": "Buy-7d", "outcome": {"event": "x", "sum": "revenue"}, "horizon": "7 days", "topevents": 3})
    message = str(error.value)
    assert "name: 'Buy-7d' is not allowed" in message
    assert "outcome: give exactly one of" in message
    assert "horizon: '7 days' is not a duration" in message
    assert "topevents: unknown field" in message


def test_missing_fields_and_bad_cadence():
    with pytest.raises(SpecError, match="horizon: required field is missing"):
        parse_spec({"name": "a", "outcome": {"event": "x"}})
    with pytest.raises(SpecError, match="must be shorter than the feature window"):
        parse_spec({"name": "a", "outcome": {"event": "x"}, "horizon": "7d", "lookback_weeks": 1, "retrain_every": "2w"})
    with pytest.raises(SpecError, match="unknown model"):
        parse_spec({"name": "a", "outcome": {"event": "x"}, "horizon": "7d", "models": ["xgboost"]})


def test_file_name_must_match_and_yaml_must_parse(tmp_path):
    wrong = tmp_path / "other.yaml"
    wrong.write_text(SAMPLE.read_text())
    with pytest.raises(SpecError, match="name the file purchase_7d.yaml"):
        load_spec(wrong)
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [unclosed")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(broken)
