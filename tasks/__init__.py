"""Pipeline steps: plain functions and the thin Prefect tasks that wrap them."""

import os

# MLflow unpickles models unless this is "false" (its default is to allow it), so a registered
# version could run code in the process that loads it. Every process of the project (the flows'
# command lines, Prefect workers, and Dask or Ray workers, which import tasks.* to unpickle a task)
# imports this package before it loads a model, and MLflow reads the variable at each load: set
# here, at import time, it holds in all of them and in what they start (`mlflow models serve`).
os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] = "false"
