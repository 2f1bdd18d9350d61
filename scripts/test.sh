#!/usr/bin/env bash
# Installs the project and its test dependencies into .venv, starts the services the tests use on 127.0.0.1
# (a Spark Connect server), runs pytest, and stops every service it started, whatever happens.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
PYTHON="${PYTHON:-python3}"

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[test]"

RUN_DIR="$(mktemp -d -t automl-test-XXXXXX)"
SPARK_HOME="$(.venv/bin/python -c 'import os, pyspark; print(os.path.dirname(pyspark.__file__))')"
SPARK_CONNECT_PORT="${SPARK_CONNECT_PORT:-15002}"
export SPARK_HOME SPARK_LOG_DIR="$RUN_DIR/spark-logs" SPARK_PID_DIR="$RUN_DIR/spark-pids" SPARK_LOCAL_IP=127.0.0.1

stop_services() {
  "$SPARK_HOME/sbin/stop-connect-server.sh" >/dev/null 2>&1 || true
  rm -rf "$RUN_DIR"
}
trap stop_services EXIT

"$SPARK_HOME/sbin/start-connect-server.sh" \
  --master "local[*]" \
  --driver-memory 4g \
  --conf spark.connect.grpc.binding.address=127.0.0.1 \
  --conf spark.connect.grpc.binding.port="$SPARK_CONNECT_PORT" \
  --conf spark.sql.session.timeZone=UTC \
  --conf spark.ui.enabled=false \
  --conf spark.sql.shuffle.partitions=8 >/dev/null
for _ in $(seq 1 90); do
  if (exec 3<>"/dev/tcp/127.0.0.1/$SPARK_CONNECT_PORT") 2>/dev/null; then break; fi
  sleep 1
done
(exec 3<>"/dev/tcp/127.0.0.1/$SPARK_CONNECT_PORT") 2>/dev/null || {
  echo "Spark Connect server did not start on 127.0.0.1:$SPARK_CONNECT_PORT; its log:" >&2
  cat "$SPARK_LOG_DIR"/* >&2 || true
  exit 1
}
export AUTOML_SPARK_REMOTE="sc://127.0.0.1:$SPARK_CONNECT_PORT"

set +e
.venv/bin/python -m pytest "$@"
status=$?
set -e
# pytest exits 5 when it collected no test: that is a failure of the suite here, never a pass.
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests" >&2
fi
exit "$status"
