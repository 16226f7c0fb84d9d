"""`branchwise serve` that cannot start says why in one short line and exits non-zero, with no
traceback (unless --log-level debug): a real subprocess per case."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
from sqlalchemy import make_url

from .conftest import PG_ADMIN_URL, ROOT, free_port, require_pg

pytestmark = pytest.mark.e2e
DEADLINE_S = 60


def _serve(env: dict[str, str], *args: str, port: int | None = None) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith("BRANCHWISE_")}
    full.update(env)
    return subprocess.run([sys.executable, "-m", "branchwise", "serve", "--port", str(port or free_port()), *args],
                          env=full, cwd=str(ROOT), capture_output=True, text=True, timeout=DEADLINE_S)


def _one_message(r: subprocess.CompletedProcess) -> str:
    out = r.stdout + r.stderr
    assert r.returncode != 0, out
    assert "Traceback" not in out, out
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, out
    assert lines[0].startswith("branchwise: cannot start: "), out
    assert r.stdout == "", out  # no banner: nothing is served
    return lines[0]


def test_missing_postgresql_database_names_the_createdb_command(tmp_path):
    require_pg()
    url = make_url(PG_ADMIN_URL).set(database="branchwise_no_such_db")
    message = _one_message(_serve({"BRANCHWISE_DATABASE_URL": url.render_as_string(hide_password=False)}))
    assert 'database "branchwise_no_such_db" does not exist' in message
    assert f"createdb -h {url.host} -p {url.port or 5432} -U {url.username} branchwise_no_such_db" in message


def test_closed_postgresql_port_says_connection_refused_and_masks_the_password():
    with socket.socket() as s:  # a port nobody listens on: bound, never listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        message = _one_message(_serve({"BRANCHWISE_DATABASE_URL": f"postgresql://app:s3cret@127.0.0.1:{port}/db"}))
    assert f"cannot connect to PostgreSQL at 127.0.0.1:{port}: connection refused" in message
    assert "s3cret" not in message and "***" in message


def test_invalid_toml_names_the_file_and_the_line(tmp_path):
    config = tmp_path / "branchwise.toml"
    config.write_text('database_url = "sqlite:///x.db"\nport = \n')
    message = _one_message(_serve({"BRANCHWISE_CONFIG": str(config)}))
    assert f"the config file {config} is not valid TOML" in message
    assert "line 2" in message


def test_invalid_value_in_the_config_file_names_the_file_and_the_line(tmp_path):
    config = tmp_path / "branchwise.toml"
    config.write_text('database_url = "sqlite:///x.db"\n\n[[upstreams]]\nname = "vllm"\nmodels = ["*"]\n')
    message = _one_message(_serve({"BRANCHWISE_CONFIG": str(config)}))
    assert f"invalid setting in {config}, line 3: upstreams[0]" in message
    assert "needs a base_url" in message


def test_missing_config_file_named_by_the_environment_is_an_error(tmp_path):
    missing = tmp_path / "nope.toml"
    message = _one_message(_serve({"BRANCHWISE_CONFIG": str(missing)}))
    assert f"BRANCHWISE_CONFIG names {missing}, which does not exist" in message


def test_port_that_is_not_a_number_names_the_variable(tmp_path):
    full = {k: v for k, v in os.environ.items() if not k.startswith("BRANCHWISE_")}
    full.update({"BRANCHWISE_PORT": "abc", "BRANCHWISE_DATABASE_URL": f"sqlite:///{tmp_path / 'b.db'}"})
    r = subprocess.run([sys.executable, "-m", "branchwise", "serve"], env=full, cwd=str(ROOT),
                       capture_output=True, text=True, timeout=DEADLINE_S)
    assert "invalid setting BRANCHWISE_PORT='abc'" in _one_message(r)


def test_port_in_use_is_said_at_once(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        message = _one_message(_serve({"BRANCHWISE_DATABASE_URL": f"sqlite:///{tmp_path / 'b.db'}"}, port=port))
    assert f"cannot listen on 127.0.0.1:{port}: port {port} is already in use" in message
    assert "--port or BRANCHWISE_PORT" in message


def test_sqlite_file_in_a_missing_folder(tmp_path):
    db = tmp_path / "no" / "such" / "folder" / "b.db"
    message = _one_message(_serve({"BRANCHWISE_DATABASE_URL": f"sqlite:///{db}"}))
    assert f"cannot open the SQLite database {db}: its folder does not exist" in message


def test_debug_level_adds_the_traceback(tmp_path):
    r = _serve({"BRANCHWISE_CONFIG": str(tmp_path / "nope.toml")}, "--log-level", "debug")
    assert r.returncode != 0
    assert "Traceback" in r.stderr and "branchwise: cannot start: BRANCHWISE_CONFIG names" in r.stderr


def test_version():
    r = subprocess.run([sys.executable, "-m", "branchwise", "--version"], capture_output=True, text=True,
                       timeout=DEADLINE_S, cwd=str(ROOT))
    from branchwise import __version__

    assert r.returncode == 0 and r.stdout.strip() == f"branchwise {__version__}"
