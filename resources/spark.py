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
    # Rollups come back to the driver as Arrow, a week of hours at a time; 4g leaves room for busy weeks.
    "spark.driver.maxResultSize": "4g",
    # Hour-partitioned reads pass one path per hour: above the default threshold (32 paths) Spark lists them with a
    # distributed job, ~10 s per view on local[*] (benchmarks/README.md); on the driver it takes ~1 s. Not for
    # clusters reading S3, where parallel listing pays.
    "spark.sql.sources.parallelPartitionDiscovery.threshold": "100000",
    "spark.sql.execution.arrow.pyspark.enabled": "true",
}


# Embedded Spark's driver and block manager serve no one but this process: on loopback only. (Spark otherwise picks
# a network interface's address when the host name resolves to loopback.) A cluster's executors must reach the
# driver, so a master URL leaves the address to Spark.
LOOPBACK_ONLY = {"spark.driver.host": "127.0.0.1", "spark.driver.bindAddress": "127.0.0.1"}


def spark_config(master: str | None = None, remote: str | None = None) -> dict[str, str]:
    """Embedded Spark, or the cluster named by a master URL (spark://, yarn, k8s://) or a Spark Connect URL."""
    if remote:
        return {"spark.remote": remote}
    return {**EMBEDDED_SPARK_CONFIG, **({"spark.master": master} if master else LOOPBACK_ONLY)}
