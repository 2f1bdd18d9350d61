"""Spark settings: embedded `local[*]`, or a cluster by configuration (a master URL or Spark Connect `sc://`).

The session comes from dagster-pyspark's lazy resource (resources/engine.py), created on first use; each run's
steps share one process, so a run starts Spark once."""

# Settings every Spark session gets: UTC so timestamps never shift, small shuffles for hour-sized data.
COMMON_SPARK_CONFIG = {
    "spark.sql.session.timeZone": "UTC",
    "spark.sql.shuffle.partitions": "8",
    "spark.sql.parquet.compression.codec": "zstd",
}

EMBEDDED_SPARK_CONFIG = {
    **COMMON_SPARK_CONFIG,
    "spark.master": "local[*]",
    "spark.app.name": "automl",
    "spark.ui.enabled": "false",
    "spark.ui.showConsoleProgress": "false",
    "spark.driver.memory": "6g",
    # Rollups come back to the driver as Arrow: a 20M-event backfill exceeds the 1g default (measured, P3).
    "spark.driver.maxResultSize": "4g",
    "spark.sql.execution.arrow.pyspark.enabled": "true",
}


def spark_config(master: str | None = None, remote: str | None = None) -> dict[str, str]:
    """Embedded Spark, or the cluster named by a master URL (spark://, yarn, k8s://) or a Spark Connect URL."""
    if remote:
        return {"spark.remote": remote}
    return {**EMBEDDED_SPARK_CONFIG, **({"spark.master": master} if master else {})}
