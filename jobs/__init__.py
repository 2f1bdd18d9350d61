"""Asset jobs: the event store, and a prediction's whole chain for one (hour, prediction) partition."""

import dagster as dg

from automl_assets.taxonomy import PREDICTION_GROUP

EVENT_STORE_GROUP = "event_store"  # the group of automl_assets.events

event_store_job = dg.define_asset_job(
    "event_store_job",
    selection=dg.AssetSelection.groups(EVENT_STORE_GROUP),
    description="Ingest landed files into hour partitions and build their rollups.",
)

prediction_job = dg.define_asset_job(
    "prediction_job",
    selection=dg.AssetSelection.groups(PREDICTION_GROUP),
    description="Taxonomy to scores for one (hour, prediction) partition.",
)
