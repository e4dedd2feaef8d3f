# MLflow's own image at the pinned version, plus what the stack's server needs: the PostgreSQL
# driver, the S3 client (artefacts proxied to the bucket) and Flask-WTF (the basic-auth app's forms).
ARG MLFLOW_VERSION
FROM ghcr.io/mlflow/mlflow:v${MLFLOW_VERSION}
ARG PSYCOPG2_VERSION
ARG BOTO3_VERSION
ARG FLASK_WTF_VERSION
RUN pip install --no-cache-dir "psycopg2-binary==${PSYCOPG2_VERSION}" "boto3==${BOTO3_VERSION}" \
    "flask-wtf==${FLASK_WTF_VERSION}"
