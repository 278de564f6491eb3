"""Helpers for the Airflow DAGs in this folder. Stdlib + PyYAML at import time: DAG parsing stays cheap
(no Ray, no torch); the project and the Ray Jobs SDK are imported inside the tasks that use them."""

# The dataset the data DAG publishes and the training DAG is scheduled on. "x-" URIs are Airflow's
# namespace for schemes that are not storage locations: each version's directory travels in the event.
SHARDS_ASSET_NAME = "jamba_pretrain_shards"
SHARDS_ASSET_URI = "x-jamba://pretrain/shards"
