"""Spark: embedded `local[*]` by default; a cluster by configuration (a master URL or Spark Connect `sc://`).

The session is dagster-pyspark's lazy resource, created on first use; the project runs each run's steps in one
process, so a run starts Spark once."""

from dagster_pyspark import LazyPySparkResource

# Settings every engine gets: UTC so timestamps never shift, small shuffles for hour-sized data.
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
    "spark.sql.execution.arrow.pyspark.enabled": "true",
}


def spark_resource(master: str | None = None, remote: str | None = None) -> LazyPySparkResource:
    """Embedded Spark, or the cluster named by a master URL (spark://, yarn, k8s://) or a Spark Connect URL."""
    if remote:
        return LazyPySparkResource(spark_config={"spark.remote": remote})
    config = dict(EMBEDDED_SPARK_CONFIG)
    if master:
        config["spark.master"] = master
    return LazyPySparkResource(spark_config=config)
