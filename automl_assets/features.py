"""Feature aggregates: rolling weekly windows per selected event, event-property and user-property features, as
of each training snapshot's cutoff (for training) and as of the partition's end (for inference), from one SQL definition."""

from datetime import datetime

import dagster as dg

from automl_assets.cohort import cohort
from automl_assets.core.feature_sql import FeatureQuery, Taxonomy, feature_query
from automl_assets.core.timewin import epoch_hour, hours_between
from automl_assets.partitions import prediction_hour_partitions
from automl_assets.predictions import INFER, PredictionRun, cutoffs_by_role, prediction_run, scoring_scope
from automl_assets.taxonomy import PREDICTION_GROUP, TAXONOMY_FILE, taxonomy
from resources.engine import EngineResource
from resources.storage import LocalStorage


COLUMNS_FILE = "columns.json"  # the feature columns in matrix order, and their values for users without a row


def load_taxonomy(storage, run: PredictionRun) -> Taxonomy:
    return Taxonomy.from_dict(storage.read_json(*run.parts("taxonomy", TAXONOMY_FILE))["taxonomy"])


def cohort_features_query(sql, cohort_path: str, chosen: Taxonomy, cutoff: datetime) -> FeatureQuery:
    """The feature rows of the cohort at `cohort_path` as of `cutoff` over the registered rollup views: only the
    cohort's users are aggregated (a capped training cohort, or the users active in the hour on an hourly run)."""
    sql.register_parquet("cohort", cohort_path)
    return feature_query(chosen, epoch_hour(cutoff), users="cohort")


@dg.asset(
    partitions_def=prediction_hour_partitions,
    deps=[taxonomy, cohort],
    group_name=PREDICTION_GROUP,
    kinds={"duckdb", "spark", "parquet"},
    description="Per user: counts in 8 rolling weeks per selected event, recency, revenue, event-property value "
    "counts and first/last user-property values, as of each training snapshot's cutoff (training runs) and as of the "
    "partition's end (for everyone on the daily run, for the users active in the hour otherwise).",
)
def feature_aggregates(
    context: dg.AssetExecutionContext, storage: LocalStorage, engine: EngineResource
) -> dg.MaterializeResult:
    run = prediction_run(context, storage)
    sql = engine.engine()
    chosen = load_taxonomy(storage, run)
    cutoffs = cutoffs_by_role(context, storage, run)
    sql.register_rollups(storage, hours_between(min(cutoffs.values()) - chosen.lookback, run.times.as_of))
    rows = {}
    for role, cutoff in cutoffs.items():
        query = cohort_features_query(sql, storage.path(*run.parts("cohort", *role)), chosen, cutoff)
        rows[role] = sql.write(query.sql, storage, run.parts("feature_aggregates", *role))
    columns = query.columns
    storage.write_json({"columns": list(columns), "absent": query.absent}, *run.parts("feature_aggregates", COLUMNS_FILE))
    return dg.MaterializeResult(
        metadata={
            "infer_users": rows.pop(INFER),
            **({"train_users": next(iter(rows.values())), "training_rows": sum(rows.values())} if rows else {}),
            "scope": scoring_scope(context, run),
            "n_features": len(columns),
            "feature_columns_sample": dg.MetadataValue.json(list(columns[:20])),
            **run.describe(),
        }
    )
