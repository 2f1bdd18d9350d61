"""The SQL engine the assets run their (shared) definitions on: DuckDB embedded by default on one machine, Spark
(`local[*]`, a standalone master or Spark Connect) by configuration. Connections are made on first use, once per
run (every run executes its steps in one process)."""

import dagster as dg
from dagster_pyspark import LazyPySparkResource
from pydantic import Field, PrivateAttr

from automl_assets.core.engines import DuckDBEngine, SparkEngine


class EngineResource(dg.ConfigurableResource):
    """What the assets ask for; the environment decides which engine stands behind it."""

    def engine(self):
        raise NotImplementedError


class DuckDBEngineResource(EngineResource):
    threads: int = Field(default=0, description="Worker threads; 0 lets DuckDB use every core.")
    memory_limit: str = Field(
        default="",
        description="DuckDB's memory limit, e.g. '8GB' or '25%' of RAM (larger operations spill to disk); empty keeps "
        "DuckDB's default, 80% of RAM. Measured at 20M events (benchmarks/README.md): '25%' made the feature steps "
        "2-3x slower (they spill) without lowering a run's peak, which is the training subprocess's.",
    )
    _engine: DuckDBEngine | None = PrivateAttr(default=None)

    def engine(self) -> DuckDBEngine:
        if self._engine is None:
            import duckdb

            connection = duckdb.connect()
            if self.threads:
                connection.execute(f"SET threads = {int(self.threads)}")
            if self.memory_limit:
                connection.execute(f"SET memory_limit = '{self.memory_limit}'")
            self._engine = DuckDBEngine(connection)
        return self._engine


class SparkEngineResource(LazyPySparkResource, EngineResource):
    """dagster-pyspark's lazy Spark session (`spark_config`: `spark.master`, or `spark.remote` for Spark Connect)."""

    def engine(self) -> SparkEngine:
        return SparkEngine(self.spark_session)
