"""hparams_search=optuna on several machines: searches that share one study in a PostgreSQL
database (hydra.sweeper.storage=postgresql://...), here two at once against a real server."""

from __future__ import annotations

import datetime
import gc
import glob
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import optuna
import pytest
import sqlalchemy
from conftest import REPO, data_overrides, read_metrics
from omegaconf import OmegaConf
from optuna.trial import TrialState

from hydra_plugins.optuna_pruning_sweeper._impl import fail_stale_trials, open_database

SERVER_PROGRAMS = ("initdb", "pg_ctl", "postgres")
DB_USER = "cifar_exp"


def postgres_bin_dir() -> Path | None:
    """The folder of PostgreSQL's server programs: on PATH, else Debian's newest
    /usr/lib/postgresql/<version>/bin; None if neither has all of them."""
    on_path = shutil.which("pg_ctl")
    debian = sorted(
        glob.glob("/usr/lib/postgresql/*/bin"),
        key=lambda folder: [int(part) for part in Path(folder).parent.name.split(".")],
        reverse=True,
    )
    candidates = ([Path(on_path).parent] if on_path else []) + [Path(f) for f in debian]
    for folder in candidates:
        if all(os.access(folder / program, os.X_OK) for program in SERVER_PROGRAMS):
            return folder
    return None


def server_account() -> pwd.struct_passwd | None:
    """The account the server runs as: postgres refuses to run as root, so as root the
    `postgres` account (the Debian package's) or else `nobody`; None: the current user."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise RuntimeError("running as root, and neither a postgres nor a nobody account exists")


@dataclass(frozen=True)
class PostgresServer:
    socket_dir: Path  # the server listens on a Unix socket here only

    def url(self, database: str) -> str:
        """The SQLAlchemy URL of one of the server's databases (psycopg2, the search extra)."""
        return f"postgresql+psycopg2://{DB_USER}@/{database}?host={self.socket_dir}"

    def create_database(self, name: str) -> str:
        """A new, empty database (what `createdb <name>` makes): its URL."""
        # CREATE DATABASE runs outside a transaction; no pool: nothing stays connected.
        admin = sqlalchemy.create_engine(
            self.url("postgres"), isolation_level="AUTOCOMMIT", poolclass=sqlalchemy.pool.NullPool
        )
        with admin.connect() as connection:
            connection.execute(sqlalchemy.text(f"CREATE DATABASE {name}"))
        return self.url(name)


@pytest.fixture(scope="module")
def postgres_server() -> Iterator[PostgresServer]:
    """A PostgreSQL server of its own in a temporary folder, for the module's tests."""
    bin_dir = postgres_bin_dir()
    if bin_dir is None:
        pytest.fail(
            "PostgreSQL's server programs (initdb, pg_ctl, postgres) are neither on PATH nor in "
            "/usr/lib/postgresql/<version>/bin: .ci/run installs them in CI; elsewhere "
            "`apt-get install postgresql` (Debian, Ubuntu) provides them"
        )
    account = server_account()
    # Not under pytest's tmp_path: its parents are private to root, and a Unix socket's path
    # must stay short (about 100 characters).
    folder = Path(tempfile.mkdtemp(prefix="cifar-exp-pg-"))
    as_server = {}
    if account is not None:
        os.chown(folder, account.pw_uid, account.pw_gid)
        as_server = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}

    def server(program: str, *args: str) -> None:
        proc = subprocess.run(
            [str(bin_dir / program), *args], cwd=folder, capture_output=True, text=True,
            timeout=120, **as_server,
        )  # fmt: skip
        if proc.returncode != 0:
            log = folder / "server.log"
            server_log = log.read_text() if log.exists() else ""
            raise RuntimeError(
                f"{program} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}{server_log}"
            )

    data = folder / "data"
    server(
        "initdb", "--pgdata", str(data), "--username", DB_USER, "--auth", "trust",
        "--encoding", "UTF8", "--locale", "C", "--no-sync",
    )  # fmt: skip
    # The socket only (no TCP port to collide with another server); fsync off: a test's data.
    options = f"-c listen_addresses='' -c unix_socket_directories={folder} -c fsync=off"
    server("pg_ctl", "--pgdata", str(data), "--log", str(folder / "server.log"), "--wait",
           "--options", options, "start")  # fmt: skip
    try:
        yield PostgresServer(folder)
    finally:
        gc.collect()  # the tests' storages close their connections while the server runs
        server("pg_ctl", "--pgdata", str(data), "--mode", "fast", "--wait", "stop")
        shutil.rmtree(folder)


@pytest.fixture
def postgres_url(postgres_server: PostgresServer, request: pytest.FixtureRequest) -> str:
    """An empty database of the test's own (named after it) on the module's server."""
    return postgres_server.create_database(request.node.originalname[:63])  # the longest name


def open_at_once(url: str, sessions: int) -> list[str]:
    """What each of `sessions` searches, released at the same moment, got from opening the
    study "shared" at `url` as the sweeper opens it: "ok", or the error. Threads, each with
    its database connections, race in the server as processes on several machines would."""
    start = threading.Barrier(sessions)

    def open_study() -> str:
        start.wait()
        try:
            storage = open_database(url, heartbeat_interval=60)
            optuna.create_study(study_name="shared", storage=storage, load_if_exists=True)
        except Exception as err:
            return f"{type(err).__name__}: {err}"
        return "ok"

    with ThreadPoolExecutor(sessions) as pool:
        return list(pool.map(lambda _: open_study(), range(sessions)))


@pytest.mark.slow
def test_searches_that_start_at_once_on_an_empty_database_all_open_it(postgres_url):
    """Each search sets Optuna's tables up in an empty database: on PostgreSQL all but the
    first fail on the rows it added (without open_database's retry, nearly every time)."""
    assert open_at_once(postgres_url, sessions=4) == ["ok"] * 4
    assert open_at_once(postgres_url, sessions=2) == ["ok"] * 2  # the tables exist by now


@pytest.mark.slow
def test_only_a_heartbeat_older_than_the_grace_period_fails_a_trial(postgres_url):
    """Another search's heartbeat recorded while the sweeper checks for stale trials is newer
    than the database time the check read first (PostgreSQL's now(): when the transaction
    began): the trial is alive (Optuna 2.10 alone failed it). One older than the grace period
    (120 s) is stale."""
    study = optuna.create_study(
        study_name="shared", storage=open_database(postgres_url, heartbeat_interval=60)
    )
    trial_id = study.ask()._trial_id
    study._storage.record_heartbeat(trial_id)
    database = sqlalchemy.create_engine(postgres_url, poolclass=sqlalchemy.pool.NullPool)

    def heartbeat_moves(seconds: int) -> TrialState:
        """The trial's state after its heartbeat moved by `seconds` and a stale check."""
        with database.begin() as connection:
            connection.execute(
                sqlalchemy.text("UPDATE trial_heartbeats SET heartbeat = heartbeat + :by"),
                {"by": datetime.timedelta(seconds=seconds)},
            )
        fail_stale_trials(study)
        return optuna.load_study(study_name="shared", storage=postgres_url).trials[0].state

    assert heartbeat_moves(+1) == TrialState.RUNNING
    assert heartbeat_moves(-200) == TrialState.FAIL


def trial_runs(output_root: Path) -> dict[int, Path]:
    """A search's run folders by the number of the trial each ran (the sweeper hands a pruned
    search's job its trial through hydra.job.env_set)."""
    runs = {}
    for hydra_yaml in (output_root / "optuna" / "shared").glob("*/.hydra/hydra.yaml"):
        env = OmegaConf.load(hydra_yaml).hydra.job.env_set
        runs[int(env.HYDRA_OPTUNA_TRIAL)] = hydra_yaml.parent.parent
    return runs


@pytest.mark.slow
def test_two_searches_at_once_share_one_study_in_postgresql(
    postgres_url, cifar_root, cache_dir, tmp_path
):
    """Two sessions of the same search started at once, as on two machines, 3 trials each of
    2 epochs on 300 real images: one study of trials 0-5, each run once by one session, with
    the value its run recorded; the jobs reopen their trials from PostgreSQL and report every
    epoch to them (the median pruner asks, but cannot prune before 6 finished trials)."""
    command = [
        sys.executable, "-m", "cifar_exp.train", "hparams_search=optuna",
        *data_overrides(cifar_root, cache_dir, train=300, test=50), "data.val_size=50",
        "data.batch_size=32",  # fixed, not searched: steps enough to leave chance
        "trainer.epochs=2", "trainer.threads=1", "logger=none", "hydra.sweeper.n_trials=3",
        "hydra.sweeper.study_name=shared", f"hydra.sweeper.storage='{postgres_url}'",
        "hydra.sweeper.pruner.n_startup_trials=6",
    ]  # fmt: skip
    roots = [tmp_path / "machine_a", tmp_path / "machine_b"]
    logs = [tmp_path / f"{root.name}.log" for root in roots]
    searches = []
    for root, log in zip(roots, logs, strict=True):
        with log.open("w") as output:
            searches.append(subprocess.Popen(
                [*command, f"output_root={root}"], cwd=REPO, stdout=output,
                stderr=subprocess.STDOUT, env={**os.environ, "HYDRA_FULL_ERROR": "0"},
            ))  # fmt: skip
    try:
        codes = [search.wait(timeout=600) for search in searches]
    finally:
        for search in searches:
            search.kill()  # one that ran past the timeout; nothing for one that ended
    outputs = "\n".join(log.read_text() for log in logs)
    assert codes == [0, 0], outputs

    trials = optuna.load_study(study_name="shared", storage=postgres_url).trials
    assert sorted(t.number for t in trials) == list(range(6)), outputs
    assert all(t.state == TrialState.COMPLETE for t in trials), outputs
    runs = [trial_runs(root) for root in roots]
    assert sorted([*runs[0], *runs[1]]) == list(range(6))  # each trial run once, by one session
    for trial in trials:
        run = {**runs[0], **runs[1]}[trial.number]
        given = dict(o.split("=", 1) for o in OmegaConf.load(run / ".hydra" / "overrides.yaml"))
        assert float(given["optimizer.lr"]) == trial.params["optimizer.lr"]
        val_acc = [epoch["val_acc"] for epoch in read_metrics(run)]
        best_so_far = {e: max(val_acc[:e]) for e in (1, 2)}
        assert trial.intermediate_values == pytest.approx(best_so_far)
        assert trial.value == pytest.approx(max(val_acc))

    # The sessions overlapped: each had started a trial before the other finished its last.
    by_number = {t.number: t for t in trials}
    starts = [min(by_number[n].datetime_start for n in session) for session in runs]
    ends = [max(by_number[n].datetime_complete for n in session) for session in runs]
    assert max(starts) < min(ends), (starts, ends)
