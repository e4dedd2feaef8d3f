# A Prefect process worker with this project installed (built with the repository as context:
# docker compose -f deploy/compose.yaml build worker). Flow runs start in /app, the project root,
# as prefect.yaml's pull step expects; torch comes from PyTorch's CPU-only index. Its arguments
# name the pool (compose passes `--pool` with settings.env's WORK_POOL):
#   docker run IMAGE --pool NAME
ARG PYTHON_VERSION
FROM python:${PYTHON_VERSION}-slim
ARG PREFECT_VERSION
ARG MLFLOW_VERSION
WORKDIR /app
COPY . /app
RUN pip install --no-cache-dir --extra-index-url https://download.pytorch.org/whl/cpu . \
    "prefect==${PREFECT_VERSION}" "mlflow==${MLFLOW_VERSION}"
RUN useradd --create-home worker && chown -R worker /app
USER worker
ENTRYPOINT ["prefect", "worker", "start"]
