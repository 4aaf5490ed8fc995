"""Real servers for the scale-out tests, on 127.0.0.1: PostgreSQL, a moto S3 server, and
`mlflow server` on both, as a team would run it. Each server is a context manager that stops it
and removes its files; test modules wrap them in fixtures of the scope they need."""

from __future__ import annotations

import glob
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import free_port, start_mlflow, stop

PG_OS_USER = "postgres"  # the Debian package's user: PostgreSQL refuses to run as root
BUCKET, ARTIFACTS_PREFIX = "phi3ops-mlflow", "artifacts"


def pg_bindir() -> Path:
    """Where initdb and pg_ctl are: pg_config's bindir when it holds them (pg_config may come
    from libpq-dev alone), else the newest /usr/lib/postgresql/*/bin, else pg_ctl's on PATH."""
    try:
        found = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True,
                               check=True).stdout.strip()
        if (Path(found) / "pg_ctl").is_file():
            return Path(found)
    except (OSError, subprocess.CalledProcessError):
        pass
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda d: int(d.split("/")[-2]))
    for d in reversed(dirs):
        if (Path(d) / "pg_ctl").is_file():
            return Path(d)
    if on_path := shutil.which("pg_ctl"):
        return Path(on_path).resolve().parent
    raise RuntimeError("PostgreSQL is not installed (no pg_ctl); `apt-get install postgresql`")


def _as_db_user(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", PG_OS_USER, "--", *cmd] if os.geteuid() == 0 else cmd


@dataclass(frozen=True)
class Postgres:
    port: int
    user: str
    password: str
    database: str
    socket_dir: Path
    bindir: Path

    @property
    def uri(self) -> str:
        """The DB URI with its password, for the MLflow server only; as MLflow's docs write it
        (SQLAlchemy 2.1 reads postgresql:// as psycopg 3, the `server` extra's driver)."""
        return f"postgresql://{self.user}:{self.password}@127.0.0.1:{self.port}/{self.database}"

    def dump(self) -> str:
        """Everything MLflow stored, as SQL: what a secret must never be part of."""
        return subprocess.run(
            _as_db_user([str(self.bindir / "pg_dump"), "-h", str(self.socket_dir), "-p",
                         str(self.port), "-U", PG_OS_USER, "--data-only", self.database]),
            capture_output=True, text=True, check=True, cwd="/").stdout


def _run(cmd: list[str], **kwargs) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, cwd="/", **kwargs)
    if done.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed ({done.returncode}):\n{done.stdout}{done.stderr}")


@contextmanager
def postgres(database: str = "mlflow", user: str = "mlflow") -> Iterator[Postgres]:
    """A fresh cluster in a temporary directory (made with mkdtemp: pytest's tmp dirs are closed
    to other users when tests run as root), TCP on 127.0.0.1 with a password role that owns
    `database`, its socket inside the data dir. fsync off: a test's cluster is thrown away."""
    bindir, base = pg_bindir(), Path(tempfile.mkdtemp(prefix="phi3ops-pg-"))
    data, log = base / "data", base / "postgres.log"
    if os.geteuid() == 0:
        shutil.chown(base, PG_OS_USER, PG_OS_USER)
    port, password = free_port(), f"pg-{secrets.token_hex(12)}"
    pg_ctl = str(bindir / "pg_ctl")
    try:
        _run(_as_db_user([str(bindir / "initdb"), "-D", str(data), "-U", PG_OS_USER, "-E", "UTF8",
                          "--auth-local=trust", "--auth-host=scram-sha-256"]))
        _run(_as_db_user([pg_ctl, "-D", str(data), "-l", str(log), "-w", "-t", "60", "-o",
                          f"-h 127.0.0.1 -p {port} -k {data} -c fsync=off "
                          "-c synchronous_commit=off -c full_page_writes=off", "start"]))
    except RuntimeError as e:
        tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
        shutil.rmtree(base, ignore_errors=True)
        raise RuntimeError(f"{e}\n{tail}") from None
    try:
        # Statements on stdin, so the password is in no process's argv.
        _run(_as_db_user([str(bindir / "psql"), "-h", str(data), "-p", str(port), "-U",
                          PG_OS_USER, "-d", "postgres", "-v", "ON_ERROR_STOP=1", "-q", "-f", "-"]),
             input=f"CREATE ROLE {user} LOGIN PASSWORD '{password}';\n"
                   f"CREATE DATABASE {database} OWNER {user};\n")
        yield Postgres(port, user, password, database, data, bindir)
    finally:
        subprocess.run(_as_db_user([pg_ctl, "-D", str(data), "-m", "fast", "-w", "stop"]),
                       capture_output=True, cwd="/")
        shutil.rmtree(base, ignore_errors=True)


@contextmanager
def moto_s3(log_dir: Path) -> Iterator[str]:
    """A moto S3 server (in memory) on a free port; yields its URL."""
    port = free_port()
    log = (log_dir / "moto.log").open("w")
    server = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen([str(server), "-H", "127.0.0.1", "-p", str(port)], stdout=log,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("moto server did not start") from None
            time.sleep(0.3)
    try:
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


@dataclass(frozen=True)
class SharedMlflow:
    """A team's MLflow server: the URL is all a client gets; the rest stays server-side."""
    url: str
    db: Postgres
    s3_endpoint: str
    aws: dict[str, str]  # the server's S3 credentials
    log: Path

    def s3(self):
        """A boto3 client with the server's credentials, to look at the bucket behind it."""
        return s3_client(self.s3_endpoint, self.aws)

    @property
    def secrets(self) -> dict[str, str]:
        return {"PostgreSQL password": self.db.password,
                "AWS secret key": self.aws["AWS_SECRET_ACCESS_KEY"]}


def s3_client(endpoint: str, aws: dict[str, str]):
    """Credentials passed in, not read from the environment: a test's client side has none."""
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=aws["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=aws["AWS_SECRET_ACCESS_KEY"],
                        region_name=aws["AWS_DEFAULT_REGION"])


@contextmanager
def shared_mlflow(home: Path, s3_endpoint: str, workers: int = 2) -> Iterator[SharedMlflow]:
    """`mlflow server` on PostgreSQL, artifacts served from s3://BUCKET/ARTIFACTS_PREFIX. Two
    workers: two processes sharing one database, as on a real server."""
    aws = {"AWS_ACCESS_KEY_ID": "phi3ops-test-key",
           "AWS_SECRET_ACCESS_KEY": f"aws-{secrets.token_hex(16)}",
           "AWS_DEFAULT_REGION": "us-east-1"}
    with postgres() as db:
        s3_client(s3_endpoint, aws).create_bucket(Bucket=BUCKET)
        port = free_port()
        proc = start_mlflow(home, port, backend=db.uri,
                            artifacts=f"s3://{BUCKET}/{ARTIFACTS_PREFIX}", workers=workers,
                            env={**aws, "MLFLOW_S3_ENDPOINT_URL": s3_endpoint})
        try:
            yield SharedMlflow(f"http://127.0.0.1:{port}", db, s3_endpoint, aws,
                               home / "server.log")
        finally:
            stop(proc)
