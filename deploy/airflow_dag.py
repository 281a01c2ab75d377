"""Airflow: the nightly run as one task, never two at once for a table.

Exit codes (docs/operations.md, "Run it every night"): 0 done; 1 failed or refused, nothing committed (retried once: a
table that moved or a flaky store passes the second time); 2 bad usage or config (a person must fix
it: the retry fails the same way); 3 committed, but over the reject warning level: the task is marked
skipped, which the UI shows apart from success, and the run's record is still its XCom. The last line
of stdout, the run's record as JSON, is the task's XCom: downstream tasks read counts and the table
version from it.
"""

from datetime import datetime, timedelta

from airflow import DAG
from airflow.operators.bash import BashOperator

CONFIG = "/etc/catalog-embed/food101.yaml"

with DAG(
    dag_id="catalog_embed_food101",
    schedule="0 2 * * *",
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,                      # one run of a table at a time
) as dag:
    BashOperator(
        task_id="embed",
        bash_command=f"catalog-embed run --config {CONFIG} --json --log-format json",
        skip_on_exit_code=3,
        retries=1,
        retry_delay=timedelta(minutes=10),
        do_xcom_push=True,                  # the last stdout line: the run's record
    )
