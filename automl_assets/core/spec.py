"""Prediction specs: one YAML file per prediction, validated with errors that say what to fix."""

import re
from datetime import timedelta
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from automl_assets.core.splits import MAX_TRAINING_USERS
from automl_assets.core.timewin import WEEK, format_duration, parse_duration

NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
MODEL_CHOICES = ("logistic_regression", "hist_gradient_boosting", "keras_mlp")


class SpecError(ValueError):
    """A prediction spec that cannot be used; the message lists every problem."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Outcome(_Strict):
    """What counts as a positive: an event (optionally with event-property filters), or a sum over the horizon."""

    event: str | None = None
    where: dict[str, str] = Field(default_factory=dict)
    sum: Literal["revenue"] | None = None

    def describe(self) -> str:
        if self.sum:
            return f"sum of {self.sum}"
        return self.event + "".join(f", {key}={value}" for key, value in sorted(self.where.items()))

    @model_validator(mode="after")
    def _one_kind(self):
        if (self.event is None) == (self.sum is None):
            raise ValueError("give exactly one of 'event' (a classification target) or 'sum: revenue' (a regression target)")
        return self

    @property
    def is_classification(self) -> bool:
        return self.event is not None


class Cohort(_Strict):
    """Who is trained on and scored: users active within `active_within` before the cutoff, optionally filtered on
    the last value of user properties."""

    active_within: str = "28d"
    where: dict[str, str] = Field(default_factory=dict)

    @field_validator("active_within")
    @classmethod
    def _duration(cls, value: str) -> str:
        parse_duration(value)
        return value


class PredictionSpec(_Strict):
    name: str
    description: str = ""
    outcome: Outcome
    horizon: str
    cohort: Cohort = Field(default_factory=Cohort)
    lookback_weeks: int = Field(default=8, ge=1, le=52)
    top_events: int = Field(default=50, ge=1, le=500)
    top_properties: int = Field(default=10, ge=0, le=200)
    max_property_values: int = Field(default=20, ge=2, le=200)
    user_property_values: int = Field(default=10, ge=2, le=200)
    retrain_every: str | None = None
    models: tuple[str, ...] = MODEL_CHOICES
    max_training_users: int = Field(default=MAX_TRAINING_USERS, ge=100)
    training_snapshots: int = Field(default=12, ge=1, le=52)
    offset: str = "0h"

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not NAME_PATTERN.match(value):
            raise ValueError(
                f"'{value}' is not allowed: a name is a lowercase letter then up to 62 lowercase letters, digits or "
                "underscores, because it is used in partition keys and storage paths"
            )
        return value

    @field_validator("horizon", "offset", "retrain_every")
    @classmethod
    def _durations(cls, value: str | None) -> str | None:
        if value is not None:
            parse_duration(value)
        return value

    @field_validator("models")
    @classmethod
    def _models(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        unknown = sorted(set(value) - set(MODEL_CHOICES))
        if unknown or not value:
            raise ValueError(f"unknown model(s) {unknown}; choose from {list(MODEL_CHOICES)}")
        return value

    @model_validator(mode="after")
    def _cadence(self):
        if self.horizon_delta <= timedelta(0):
            raise ValueError("horizon must be longer than 0h")
        if self.retrain_delta >= self.lookback:
            raise ValueError(
                f"retrain_every ({self.retrain_every}) must be shorter than the feature window "
                f"({self.lookback_weeks} weeks) so that models never lag the features they see"
            )
        return self

    @property
    def horizon_delta(self) -> timedelta:
        return parse_duration(self.horizon)

    @property
    def offset_delta(self) -> timedelta:
        return parse_duration(self.offset)

    @property
    def lookback(self) -> timedelta:
        return self.lookback_weeks * WEEK

    @property
    def active_within_delta(self) -> timedelta:
        return parse_duration(self.cohort.active_within)

    @property
    def retrain_delta(self) -> timedelta:
        """Default cadence: daily up to a weekly horizon, weekly beyond (always shorter than the feature window)."""
        if self.retrain_every is not None:
            return parse_duration(self.retrain_every)
        return timedelta(days=1) if self.horizon_delta <= WEEK else WEEK

    def to_yaml(self) -> str:
        data = self.model_dump(exclude_defaults=False)
        data["models"] = list(self.models)
        data["retrain_every"] = format_duration(self.retrain_delta)
        return yaml.safe_dump(data, sort_keys=False)


def _describe(error: ValidationError, source: str) -> str:
    lines = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown field; check the spelling against docs/predictions.md"
        elif item["type"] == "missing":
            message = "required field is missing"
        lines.append(f"  - {where}: {message}")
    return f"{source} is not a valid prediction spec:\n" + "\n".join(lines)


def parse_spec(data: object, source: str = "spec") -> PredictionSpec:
    if not isinstance(data, dict):
        raise SpecError(f"{source} is not a valid prediction spec: expected a mapping of fields, got {type(data).__name__}.")
    try:
        return PredictionSpec.model_validate(data)
    except ValidationError as error:
        raise SpecError(_describe(error, source)) from None


def load_spec(path: str | Path) -> PredictionSpec:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as error:
        raise SpecError(f"cannot read prediction spec {path}: {error.strerror}.") from None
    except yaml.YAMLError as error:
        raise SpecError(f"{path} is not valid YAML: {error}") from None
    spec = parse_spec(data, str(path))
    if path.stem != spec.name:
        raise SpecError(f"{path}: the file is named '{path.stem}' but the spec's name is '{spec.name}'; name the file {spec.name}.yaml.")
    return spec


def spec_from_text(text: str, source: str = "spec") -> PredictionSpec:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise SpecError(f"{source} is not valid YAML: {error}") from None
    return parse_spec(data, source)
