"""Long-running processes of the no-Docker stack: started in their own sessions with a pid file
and a log in the state folder, waited for until they answer, and stopped with their whole group.
PostgreSQL is run by its own `initdb`/`pg_ctl`, as the `postgres` user when this runs as root."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Optional

Reader = Callable[[], str]  # returns a (redacted) log tail


class StackError(RuntimeError):
    """A service that would not start or stop; the message carries its log tail."""


def _stat(pid: int) -> Optional[list[str]]:
    """Fields of /proc/PID/stat after the command name, or None when there is no such process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()  # [0] state, [2] process group, [19] start time


def start_time(pid: int) -> Optional[str]:
    fields = _stat(pid)
    return fields[19] if fields else None


def group_alive(pgid: int) -> bool:
    """Whether any process of group `pgid` still runs (zombies count as gone)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields and fields[2] == str(pgid) and fields[0] != "Z":
                return True
    return False


class Pidfile:
    """PID and start time of a process this stack started, so a recycled PID is never signalled."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, pid: int) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(f"{pid} {start_time(pid)}\n")

    def running_pid(self) -> Optional[int]:
        """The recorded process, if it (or the rest of its group) is still running."""
        try:
            pid, started = self.path.read_text().split()
        except (OSError, ValueError):
            return None
        alive = start_time(int(pid)) == started or group_alive(int(pid))
        return int(pid) if alive else None


def start_detached(
    argv: list[str], env: dict[str, str], cwd: Path, log: Path, pidfile: Pidfile
) -> subprocess.Popen:
    """Starts `argv` in a new session, output appended to `log`, and records it in `pidfile`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        process = subprocess.Popen(
            argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    pidfile.write(process.pid)
    return process


def stop_group(pidfile: Pidfile, grace: float = 20, child: Optional[subprocess.Popen] = None) -> None:
    """SIGTERM to the recorded process group, SIGKILL after `grace` seconds; no-op when gone."""
    pid = pidfile.running_pid()
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10)):
        if pid is None or not group_alive(pid):
            break
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and group_alive(pid):
            if child is not None:
                child.poll()  # reaps our own child, which would otherwise linger as a zombie
            time.sleep(0.2)
    if child is not None and child.poll() is None:
        child.wait(timeout=10)
    pidfile.path.unlink(missing_ok=True)


def wait_until_answers(url: str, name: str, alive: Callable[[], bool], log: Reader, seconds: float) -> None:
    """Polls `url` until it answers HTTP 200 (any answer when `url` ends in '*')."""
    any_status = url.endswith("*")
    url = url.rstrip("*")
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not alive():
            raise StackError(f"{name} exited while starting; its log ends:\n{log()}")
        try:
            with urllib.request.urlopen(url, timeout=3):
                return
        except urllib.error.HTTPError:
            if any_status:
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise StackError(f"{name} did not answer {url} within {seconds:.0f} s; its log ends:\n{log()}")


def tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


class Postgres:
    """A PostgreSQL cluster in `data`, driven by its own binaries."""

    def __init__(self, version: str, data: Path, log: Path) -> None:
        self.version, self.data, self.log = version, data, log
        self.as_root = os.geteuid() == 0

    def bindir(self) -> Path:
        """PostgreSQL $POSTGRES_VERSION's binaries: Debian's layout, else pg_config's."""
        debian = Path(f"/usr/lib/postgresql/{self.version}/bin")
        if (debian / "pg_ctl").exists():
            return debian
        if shutil.which("pg_config"):
            found = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True)
            if found.returncode == 0 and (Path(found.stdout.strip()) / "pg_ctl").exists():
                return Path(found.stdout.strip())
        raise StackError(
            f"PostgreSQL {self.version}'s initdb and pg_ctl were not found in {debian} or through "
            f"pg_config: install postgresql-{self.version}, or set POSTGRES_VERSION to the installed one"
        )

    def _run(self, tool: str, *args: str) -> subprocess.CompletedProcess:
        # PostgreSQL refuses to run as root: its tools then run as the `postgres` user.
        argv = [str(self.bindir() / tool), *args]
        argv = ["runuser", "-u", "postgres", "--", *argv] if self.as_root else argv
        return subprocess.run(argv, capture_output=True, text=True, timeout=120)

    def _own(self, path: Path) -> None:
        if self.as_root:
            shutil.chown(path, "postgres", "postgres")

    def init(self, user: str, password: str) -> None:
        """initdb with `user` as the superuser, password authentication; once per data folder."""
        if (self.data / "PG_VERSION").exists():
            return
        self.data.mkdir(parents=True, exist_ok=True)
        self._own(self.data)
        if self.as_root and self._run("pg_ctl", "--version").returncode != 0:
            raise StackError(f"the postgres user cannot run PostgreSQL's binaries ({self.bindir()})")
        if (
            self.as_root
            and subprocess.run(["runuser", "-u", "postgres", "--", "test", "-w", str(self.data)]).returncode
        ):
            raise StackError(
                f"PostgreSQL runs as the postgres user, which cannot reach {self.data}: "
                "choose a --state-dir (STATE_DIR) every user can traverse, e.g. under /srv or /var/lib"
            )
        pwfile = self.data.parent / ".pgpass-init"
        pwfile.write_text(password + "\n")
        pwfile.chmod(0o600)
        self._own(pwfile)
        try:
            done = self._run("initdb", "-D", str(self.data), "-U", user, f"--pwfile={pwfile}",
                             "--auth=scram-sha-256", "-E", "UTF8", "--locale=C")  # fmt: skip
        finally:
            pwfile.unlink(missing_ok=True)
        if done.returncode != 0:
            shutil.rmtree(self.data, ignore_errors=True)  # a half-made cluster would block the next try
            raise StackError(f"initdb failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")

    def start(self, host: str, port: str, socket_dir: Path) -> None:
        socket_dir.mkdir(parents=True, exist_ok=True)
        self._own(socket_dir)
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self.log.touch()
        self._own(self.log)
        # Unix socket paths are limited to 107 bytes; beyond that, TCP only.
        sockets = str(socket_dir) if len(str(socket_dir)) < 90 else ""
        options = f"-c listen_addresses={host} -p {port} -c unix_socket_directories='{sockets}'"
        done = self._run(
            "pg_ctl", "start", "-w", "-t", "60", "-D", str(self.data), "-l", str(self.log), "-o", options
        )
        if done.returncode != 0:
            raise StackError(f"PostgreSQL did not start:\n{done.stdout[-1000:]}\n{tail(self.log)}")

    def pid(self) -> Optional[int]:
        """The postmaster's PID while it runs."""
        try:
            pid = int((self.data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if start_time(pid) is not None else None

    def stop(self) -> None:
        """`pg_ctl stop -m fast`; nothing when it is not running."""
        if self.pid() is None:
            return
        done = self._run("pg_ctl", "stop", "-m", "fast", "-w", "-D", str(self.data))
        if done.returncode != 0 and self.pid() is not None:
            raise StackError(f"pg_ctl stop failed:\n{done.stderr[-1000:]}")
