"""Cohort: the users a prediction trains on (as of each training snapshot's cutoff) and scores (as of the
partition's end). It also decides how many weekly snapshots a training run stacks."""

import dagster as dg
import pyarrow.parquet as pq

from automl_assets.core import quality
from automl_assets.core.splits import SPLIT_SEED, VALIDATION_FRACTION, split_users
from automl_assets.core.feature_sql import cohort_query
from automl_assets.core.timewin import HOUR, epoch_hour, hours_between
from automl_assets.events import hourly_rollups
from automl_assets.partitions import prediction_hour_partitions
from automl_assets.predictions import (
    INFER,
    SCOPE_FILE,
    SNAPSHOTS_FILE,
    candidate_snapshots,
    prediction_run,
    scoring_scope,
    snapshot_role,
    trains_in_this_run,
)
from automl_assets.taxonomy import PREDICTION_GROUP, SAME_HOUR
from resources.engine import EngineResource
from resources.storage import LocalStorage


def sample_training_users(storage, parts: tuple[str, ...], limit: int) -> int:
    """Keep `limit` users of the training cohort at `parts`: the ones the training split would keep under the spec's
    `max_training_users` (splits.split_users: a keyed hash of user_id, both sides of the split in proportion), so a
    user stays in or out from one retrain to the next, and the features, labels and matrix of a big cohort are built
    for the users trained on only."""
    cohort = pq.read_table(storage.path(*parts))
    train, validation = split_users(
        cohort["user_id"].to_pandas(), validation_fraction=VALIDATION_FRACTION, max_training_users=limit, seed=SPLIT_SEED
    )
    with storage.temp_dir() as temp:
        (temp / "sample").mkdir()
        pq.write_table(cohort.filter(train | validation), temp / "sample" / "part-0.parquet", compression="zstd")
        storage.install(temp / "sample", *parts)
    return int((train | validation).sum())


@dg.asset(
    partitions_def=prediction_hour_partitions,
    deps=[dg.AssetDep(hourly_rollups, partition_mapping=SAME_HOUR)],
    group_name=PREDICTION_GROUP,
    kinds={"duckdb", "spark", "parquet"},
    description="Users active within the spec's `cohort.active_within` before each cutoff whose latest user "
    "properties match `cohort.where`; the inference cohort of an hourly run keeps those active in the hour. "
    f"Training runs stack weekly snapshots, newest first, until {quality.ENOUGH_TRAINING_ROWS:,} rows, "
    "`training_snapshots` or the history runs out; a snapshot of more than `max_training_users` users is sampled "
    "down to that many.",
)
def cohort(context: dg.AssetExecutionContext, storage: LocalStorage, engine: EngineResource) -> dg.MaterializeResult:
    run = prediction_run(context, storage)
    sql = engine.engine()
    spec = run.spec
    active_hours = int(spec.active_within_delta / HOUR)
    snapshots = candidate_snapshots(storage, run) if trains_in_this_run(context) else []
    earliest = min([run.times.as_of, *(s.cutoff for s in snapshots)]) - max(spec.active_within_delta, spec.lookback)
    sql.register_rollups(storage, hours_between(earliest, run.times.as_of))

    def write(role: tuple[str, ...], cutoff, only_active: bool = False) -> int:
        query = cohort_query(epoch_hour(cutoff), active_hours, spec.lookback_weeks, dict(spec.cohort.where), only_active)
        return sql.write(query, storage, run.parts("cohort", *role))

    def write_training(snapshot) -> int:
        users = write(snapshot_role(snapshot), snapshot.cutoff)
        if users <= spec.max_training_users:
            return users
        return sample_training_users(storage, run.parts("cohort", *snapshot_role(snapshot)), spec.max_training_users)

    scope = scoring_scope(context, run)
    metadata = {"infer_users": write(INFER, run.times.as_of, only_active=scope == "active"), "scope": scope}
    storage.write_json({"scope": scope}, *run.parts("cohort", SCOPE_FILE))
    if snapshots:
        train_users = []
        for snapshot in snapshots:
            train_users.append(write_training(snapshot))
            if train_users[0] == 0:
                raise dg.Failure(
                    f"the training cohort of {run.prediction} as of {snapshot.cutoff.isoformat()} is empty: no user "
                    f"was active within {spec.cohort.active_within} (filter {dict(spec.cohort.where)}); check the "
                    "filter or materialise more history."
                )
            if sum(train_users) >= quality.ENOUGH_TRAINING_ROWS:
                break
        storage.write_json({"count": len(train_users)}, *run.parts("cohort", SNAPSHOTS_FILE))
        metadata.update(
            train_users=train_users[0],
            training_snapshots=len(train_users),
            training_rows=sum(train_users),
            users_per_snapshot=dg.MetadataValue.json(
                {snapshot.cutoff.isoformat(): n for snapshot, n in zip(snapshots, train_users)}
            ),
        )
    return dg.MaterializeResult(metadata={**metadata, **run.describe()})
