"""Asset jobs: the event store; a prediction's whole chain (training runs); its scoring path (hourly and daily)."""

import dagster as dg

from automl_assets.taxonomy import PREDICTION_GROUP

EVENT_STORE_GROUP = "event_store"  # the group of automl_assets.events
TRAINING_ONLY = ["labels", "model", "calibrator"]

event_store_job = dg.define_asset_job(
    "event_store_job",
    selection=dg.AssetSelection.groups(EVENT_STORE_GROUP),
    description="Ingest landed files into hour partitions and build their rollups (a range of hours is one run).",
)

prediction_job = dg.define_asset_job(
    "prediction_job",
    selection=dg.AssetSelection.groups(PREDICTION_GROUP),
    description="Taxonomy to scores for one (hour, prediction) partition, training and calibrating a new model.",
)

scoring_job = dg.define_asset_job(
    "scoring_job",
    selection=dg.AssetSelection.groups(PREDICTION_GROUP) - dg.AssetSelection.assets(*TRAINING_ONLY),
    description="Features and scores for one (hour, prediction) partition with the model in force; no training.",
)
