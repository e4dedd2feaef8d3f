"""The team stack's settings and each server's command line and environment, built from them.

compose.yaml's containers and the no-Docker script both start their servers through these
functions (`stack.py serve NAME` in a container), so the two cannot drift. Standard library only:
this module runs inside the MLflow and Prefect images.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Mapping, Optional
from urllib.parse import quote

HERE = Path(__file__).resolve().parent
SETTINGS_FILE = HERE / "settings.env"
# Values never printed, and redacted from any log tail shown.
SECRET_KEYS = (
    "POSTGRES_PASSWORD",
    "S3_SECRET_ACCESS_KEY",
    "MLFLOW_ADMIN_PASSWORD",
    "MLFLOW_FLASK_SECRET_KEY",
    "PREFECT_SERVER_API_AUTH_STRING",
)
# Variables only servers may hold: a client or worker writes artefacts through the tracking server.
SERVER_ONLY = ("AWS_", "MLFLOW_S3_", "S3_", "POSTGRES_", "MLFLOW_ADMIN_", "MLFLOW_FLASK_")
NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
PERMISSIONS = ("READ", "EDIT", "MANAGE", "NO_PERMISSIONS")

Settings = dict[str, str]
Command = tuple[list[str], dict[str, str]]  # argv, and the variables to add to the environment


class SettingsError(ValueError):
    """A setting with a value the stack cannot use."""


def read_settings_file(path: Path = SETTINGS_FILE) -> Settings:
    """The KEY=VALUE lines of a settings file, in order."""
    values: Settings = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep or not NAME.fullmatch(key.strip()):
            raise SettingsError(f"{path}:{number}: expected KEY=VALUE, got {line.split('=')[0]!r}")
        values[key.strip()] = _plain(value.strip(), f"{path}:{number}: {key.strip()}")
    return values


def _plain(value: str, where: str) -> str:
    """`value`, refused where compose's env-file reading would give something else than this one."""
    # Compose strips quotes, drops " #..." and expands $; the servers must see what compose sees.
    if value[:1] in ("'", '"') or " #" in value or "$" in value:
        raise SettingsError(f"{where}: quotes, ' #' and '$' are not accepted in a value: write it plain")
    return value


def load_settings(
    overrides: Optional[Mapping[str, object]] = None,
    environ: Optional[Mapping[str, str]] = None,
    path: Path = SETTINGS_FILE,
) -> Settings:
    """The file's settings, each overridden by the environment, then by `overrides`; validated."""
    defaults = read_settings_file(path)
    environ = os.environ if environ is None else environ
    unknown = sorted(set(overrides or {}) - set(defaults))
    if unknown:
        raise SettingsError(f"unknown setting(s) {unknown}; accepted: {sorted(defaults)}")
    settings = {key: environ.get(key, value) for key, value in defaults.items()}
    settings.update({key: str(value) for key, value in (overrides or {}).items()})
    validate(settings)
    return settings


def _bad(settings: Settings, key: str, expected: str) -> SettingsError:
    shown = "(hidden)" if key in SECRET_KEYS else repr(settings[key])
    return SettingsError(f"setting {key}={shown} is not valid: expected {expected}")


def validate(settings: Settings) -> None:
    """Refuses values the servers would reject later, naming the setting and what it accepts."""
    ports = [key for key in settings if key.endswith("_PORT")]
    for key in ports:
        if not settings[key].isdigit() or not 0 < int(settings[key]) < 65536:
            raise _bad(settings, key, "a port number, 1 to 65535")
    for key in ("POSTGRES_USER", "MLFLOW_DB", "MLFLOW_AUTH_DB", "PREFECT_DB"):
        if not NAME.fullmatch(settings[key]):
            raise _bad(settings, key, "letters, digits and _, not starting with a digit")
    if not BUCKET.fullmatch(settings["S3_BUCKET"]):
        raise _bad(settings, "S3_BUCKET", "an S3 bucket name: 3-63 of a-z, 0-9, '.', '-'")
    if len(settings["MLFLOW_ADMIN_PASSWORD"]) < 12:
        raise _bad(settings, "MLFLOW_ADMIN_PASSWORD", "12 characters or more (MLflow's rule)")
    if len(settings["S3_SECRET_ACCESS_KEY"]) < 8:
        raise _bad(settings, "S3_SECRET_ACCESS_KEY", "8 characters or more (MinIO's rule)")
    if ":" not in settings["PREFECT_SERVER_API_AUTH_STRING"]:
        raise _bad(settings, "PREFECT_SERVER_API_AUTH_STRING", "user:password")
    if settings["MLFLOW_DEFAULT_PERMISSION"] not in PERMISSIONS:
        raise _bad(settings, "MLFLOW_DEFAULT_PERMISSION", f"one of {PERMISSIONS}")
    for key in ("POSTGRES_PASSWORD", "MLFLOW_FLASK_SECRET_KEY", "WORK_POOL", "MLFLOW_ADMIN_USER"):
        if not settings[key]:
            raise _bad(settings, key, "a value")
    if not settings["MLFLOW_WORKERS"].isdigit() or int(settings["MLFLOW_WORKERS"]) < 1:
        raise _bad(settings, "MLFLOW_WORKERS", "a whole number, 1 or more")
    if not settings["MLFLOW_AUTH_CACHE_SECONDS"].isdigit():
        raise _bad(settings, "MLFLOW_AUTH_CACHE_SECONDS", "a whole number of seconds, 0 or more")


def redact(text: str, settings: Settings) -> str:
    """`text` with every secret setting's value (also URL-quoted) replaced by ***."""
    for key in SECRET_KEYS:
        for value in {settings[key], quote(settings[key], safe="")}:
            if value:
                text = text.replace(value, "***")
    return text


# SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3; MLflow's images and this stack ship psycopg2.
MLFLOW_DRIVER = "postgresql+psycopg2"


def postgres_url(settings: Settings, database: str, driver: str = "postgresql") -> str:
    """URL of one of the stack's databases (holds the password: never print it)."""
    user, password = (quote(settings[key], safe="") for key in ("POSTGRES_USER", "POSTGRES_PASSWORD"))
    host, port = settings["POSTGRES_HOST"], settings["POSTGRES_PORT"]
    return f"{driver}://{user}:{password}@{host}:{port}/{database}"


def mlflow_url(settings: Settings) -> str:
    return f"http://{settings['MLFLOW_HOST']}:{settings['MLFLOW_PORT']}"


def prefect_api_url(settings: Settings) -> str:
    return f"http://{settings['PREFECT_HOST']}:{settings['PREFECT_PORT']}/api"


def s3_endpoint(settings: Settings) -> str:
    """The configured S3 store, or the one the script starts."""
    return settings["S3_ENDPOINT_URL"] or f"http://{settings['S3_HOST']}:{settings['S3_PORT']}"


def server_s3(settings: Settings) -> dict[str, str]:
    """What a server (or a test inspecting the bucket) needs to reach the S3 store."""
    return {
        "endpoint_url": s3_endpoint(settings),
        "aws_access_key_id": settings["S3_ACCESS_KEY_ID"],
        "aws_secret_access_key": settings["S3_SECRET_ACCESS_KEY"],
        "region_name": settings["S3_REGION"],
        "bucket": settings["S3_BUCKET"],
    }


def client_env(settings: Settings) -> dict[str, str]:
    """What a client or worker exports to use the stack: no S3 or database credentials."""
    return {
        "MLFLOW_TRACKING_URI": mlflow_url(settings),
        "MLFLOW_TRACKING_USERNAME": settings["MLFLOW_ADMIN_USER"],
        "MLFLOW_TRACKING_PASSWORD": settings["MLFLOW_ADMIN_PASSWORD"],
        "PREFECT_API_URL": prefect_api_url(settings),
        "PREFECT_API_AUTH_STRING": settings["PREFECT_SERVER_API_AUTH_STRING"],
    }


def client_environ(settings: Settings, base: Mapping[str, str]) -> dict[str, str]:
    """`base` without any server-side credential, plus the client exports."""
    kept = {key: value for key, value in base.items() if not key.startswith(SERVER_ONLY)}
    kept.pop("PREFECT_SERVER_API_AUTH_STRING", None)
    return {**kept, **client_env(settings)}


def auth_ini(settings: Settings) -> str:
    """MLflow basic-auth's config file; the admin is created from it on the first start."""
    # configparser interpolates '%': a URL-quoted password would otherwise break it.
    database = postgres_url(settings, settings["MLFLOW_AUTH_DB"], MLFLOW_DRIVER).replace("%", "%%")
    return (
        "[mlflow]\n"
        f"default_permission = {settings['MLFLOW_DEFAULT_PERMISSION']}\n"
        f"database_uri = {database}\n"
        f"admin_username = {settings['MLFLOW_ADMIN_USER']}\n"
        f"admin_password = {settings['MLFLOW_ADMIN_PASSWORD'].replace('%', '%%')}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        f"auth_cache_ttl_seconds = {settings['MLFLOW_AUTH_CACHE_SECONDS']}\n"
    )


def write_auth_ini(settings: Settings, path: Path) -> Path:
    """Writes MLflow basic-auth's config file where only its owner can read it (it holds passwords)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.chmod(0o600)
    path.write_text(auth_ini(settings))
    return path


def allowed_hosts(settings: Settings) -> str:
    names = ["localhost", "127.0.0.1", settings["MLFLOW_HOST"], *settings["MLFLOW_ALLOWED_HOSTS"].split(",")]
    names = list(dict.fromkeys(name.strip() for name in names if name.strip()))
    return ",".join(f"{name},{name}:*" for name in names)


def mlflow_server(settings: Settings, ini_path: Path) -> Command:
    """`mlflow server` on PostgreSQL, proxying artefacts to S3, behind basic auth."""
    argv = [sys.executable, "-m", "mlflow", "server", "--host", settings["BIND_HOST"]]
    argv += ["--port", settings["MLFLOW_PORT"], "--workers", settings["MLFLOW_WORKERS"]]
    argv += ["--serve-artifacts", "--artifacts-destination", f"s3://{settings['S3_BUCKET']}/artifacts"]
    argv += ["--app-name", "basic-auth", "--allowed-hosts", allowed_hosts(settings)]
    env = {
        # --backend-store-uri's own variable: the password stays out of the process list.
        "MLFLOW_BACKEND_STORE_URI": postgres_url(settings, settings["MLFLOW_DB"], MLFLOW_DRIVER),
        "MLFLOW_AUTH_CONFIG_PATH": str(ini_path),
        "MLFLOW_FLASK_SERVER_SECRET_KEY": settings["MLFLOW_FLASK_SECRET_KEY"],
        "MLFLOW_S3_ENDPOINT_URL": s3_endpoint(settings),
        "AWS_ACCESS_KEY_ID": settings["S3_ACCESS_KEY_ID"],
        "AWS_SECRET_ACCESS_KEY": settings["S3_SECRET_ACCESS_KEY"],
        "AWS_DEFAULT_REGION": settings["S3_REGION"],
        # MLflow's job runner serves GenAI jobs (scorers, trace archival) this project never submits;
        # off, it does not start a second set of processes that each import MLflow.
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    return argv, env


def prefect_server(settings: Settings, prefect_home: Path) -> Command:
    """`prefect server start` on PostgreSQL, behind the API auth string."""
    argv = [sys.executable, "-m", "prefect", "server", "start", "--host", settings["BIND_HOST"]]
    argv += ["--port", settings["PREFECT_PORT"]]
    env = {
        "PREFECT_HOME": str(prefect_home),
        "PREFECT_API_DATABASE_CONNECTION_URL": postgres_url(
            settings, settings["PREFECT_DB"], driver="postgresql+asyncpg"
        ),
        "PREFECT_SERVER_API_AUTH_STRING": settings["PREFECT_SERVER_API_AUTH_STRING"],
        # The address a browser on a client machine calls, not the one the server binds.
        "PREFECT_UI_API_URL": prefect_api_url(settings),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    return argv, env


def s3_server(settings: Settings) -> Command:
    """moto's S3 server (in memory), for machines without an S3 store."""
    return [sys.executable, "-m", "moto.server", "-H", settings["S3_HOST"], "-p", settings["S3_PORT"]], {}


def worker(settings: Settings, name: Optional[str] = None) -> Command:
    """A process worker of the stack's work pool (client credentials only)."""
    argv = [sys.executable, "-m", "prefect", "worker", "start", "--pool", settings["WORK_POOL"]]
    return argv + (["--name", name] if name else []), client_env(settings)


def create_pool(settings: Settings) -> Command:
    argv = [sys.executable, "-m", "prefect", "work-pool", "create", settings["WORK_POOL"]]
    return argv + ["--type", "process"], client_env(settings)
