"""Typed environment readers (``queueworker.config.Env``): good values, bad values, files."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from django.core.exceptions import ImproperlyConfigured

from queueworker.config import Env, local_secret_key

ROOT = Path(__file__).resolve().parents[2]


def _bad(name: str) -> Any:
    """Expect ImproperlyConfigured with a message that names the variable."""
    return pytest.raises(ImproperlyConfigured, match=rf"\b{name}\b")


# --- str -------------------------------------------------------------------------------------


def test_str_set_returned():
    assert Env({"QW_X": "value"}).str("QW_X", "default") == "value"


@pytest.mark.parametrize("environ", [{}, {"QW_X": ""}], ids=["unset", "empty"])
def test_str_unset_or_empty_default(environ):
    assert Env(environ).str("QW_X", "default") == "default"


# --- bool ------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["1", "true", "True", "YES", "on", " true "])
def test_bool_truthy_true(value):
    assert Env({"QW_FLAG": value}).bool("QW_FLAG", False) is True


@pytest.mark.parametrize("value", ["0", "false", "FALSE", "no", "off"])
def test_bool_falsy_false(value):
    assert Env({"QW_FLAG": value}).bool("QW_FLAG", True) is False


def test_bool_unset_default():
    assert Env({}).bool("QW_FLAG", True) is True


@pytest.mark.parametrize("value", ["maybe", "2", "y", "enabled"])
def test_bool_bad_value_names_variable(value):
    with _bad("QW_FLAG"):
        Env({"QW_FLAG": value}).bool("QW_FLAG", False)


# --- int -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "expected"), [("42", 42), (" 7 ", 7), ("-3", -3), ("0", 0)])
def test_int_parsed(value, expected):
    assert Env({"QW_N": value}).int("QW_N", 1) == expected


@pytest.mark.parametrize(
    "environ", [{}, {"QW_N": ""}, {"QW_N": "  "}], ids=["unset", "empty", "blank"]
)
def test_int_unset_or_blank_default(environ):
    assert Env(environ).int("QW_N", 30) == 30


@pytest.mark.parametrize("value", ["abc", "1.5", "10s", "0x10", "one"])
def test_int_bad_value_names_variable(value):
    with _bad("QW_N") as excinfo:
        Env({"QW_N": value}).int("QW_N", 1)
    assert repr(value) in str(excinfo.value)


def test_int_bounds_inclusive():
    env = Env({"QW_LOW": "1", "QW_HIGH": "10"})
    assert env.int("QW_LOW", 5, minimum=1, maximum=10) == 1
    assert env.int("QW_HIGH", 5, minimum=1, maximum=10) == 10


def test_int_below_minimum_refused():
    with _bad("QW_N") as excinfo:
        Env({"QW_N": "0"}).int("QW_N", 5, minimum=1)
    assert "at least 1" in str(excinfo.value)


def test_int_above_maximum_refused():
    with _bad("QW_N") as excinfo:
        Env({"QW_N": "601"}).int("QW_N", 60, minimum=0, maximum=600)
    assert "at most 600" in str(excinfo.value)


# --- float -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "expected"), [("2.5", 2.5), ("3", 3.0), (" 0.05 ", 0.05)])
def test_float_parsed(value, expected):
    assert Env({"QW_F": value}).float("QW_F", 1.0) == expected


def test_float_unset_default():
    assert Env({}).float("QW_F", 1.5) == 1.5


@pytest.mark.parametrize("value", ["abc", "1,5", "2s"])
def test_float_bad_value_names_variable(value):
    with _bad("QW_F"):
        Env({"QW_F": value}).float("QW_F", 1.0)


def test_float_bounds_refused_outside():
    with _bad("QW_F"):
        Env({"QW_F": "0.01"}).float("QW_F", 1.0, minimum=0.05)
    with _bad("QW_F"):
        Env({"QW_F": "10.5"}).float("QW_F", 1.0, maximum=10.0)
    assert Env({"QW_F": "10.0"}).float("QW_F", 1.0, minimum=0.1, maximum=10.0) == 10.0


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_float_non_finite_refused(value):
    with _bad("QW_F"):
        Env({"QW_F": value}).float("QW_F", 1.0, minimum=-1e9)


# --- list, choice, rate ----------------------------------------------------------------------


def test_list_splits_on_commas_and_drops_blanks():
    assert Env({"QW_L": " a, b ,,c ,"}).list("QW_L", ["x"]) == ["a", "b", "c"]


def test_list_unset_default_copy():
    default = ["x"]
    value = Env({}).list("QW_L", default)
    value.append("y")
    assert default == ["x"]


def test_list_empty_is_empty_list():
    assert Env({"QW_L": ""}).list("QW_L", ["x"]) == []


def test_choice_case_insensitive():
    env = Env({"LOG_FORMAT": "JSON"})
    assert env.choice("LOG_FORMAT", "console", ("json", "console")) == "json"


def test_choice_unset_default():
    assert Env({}).choice("LOG_FORMAT", "console", ("json", "console")) == "console"


def test_choice_bad_value_names_variable_and_choices():
    with _bad("LOG_FORMAT") as excinfo:
        Env({"LOG_FORMAT": "xml"}).choice("LOG_FORMAT", "console", ("json", "console"))
    assert "json, console" in str(excinfo.value)


@pytest.mark.parametrize("value", ["50/second", "1000/minute", "5/s", "10/h", "1/day"])
def test_rate_valid_returned(value):
    assert Env({"QW_THROTTLE_CREATE": value}).rate("QW_THROTTLE_CREATE", None) == value


@pytest.mark.parametrize("environ", [{}, {"QW_THROTTLE_CREATE": ""}], ids=["unset", "empty"])
def test_rate_unset_default(environ):
    assert Env(environ).rate("QW_THROTTLE_CREATE", None) is None


@pytest.mark.parametrize("value", ["fast", "50", "50/week", "/second", "1.5/s", "-1/s"])
def test_rate_bad_value_names_variable(value):
    with _bad("QW_THROTTLE_CREATE"):
        Env({"QW_THROTTLE_CREATE": value}).rate("QW_THROTTLE_CREATE", None)


# --- <NAME>_FILE -----------------------------------------------------------------------------


def test_file_variable_read_and_stripped(tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("s3cr3t\n")

    env = Env({"DJANGO_SECRET_KEY_FILE": str(secret), "DJANGO_SECRET_KEY": "ignored"})

    assert env.str("DJANGO_SECRET_KEY", "default") == "s3cr3t"


def test_file_variable_typed(tmp_path):
    number = tmp_path / "lease"
    number.write_text("45\n")
    assert Env({"QW_LEASE_SECONDS_FILE": str(number)}).int("QW_LEASE_SECONDS", 30) == 45


def test_file_variable_bad_content_names_variable(tmp_path):
    number = tmp_path / "lease"
    number.write_text("abc")
    with _bad("QW_LEASE_SECONDS"):
        Env({"QW_LEASE_SECONDS_FILE": str(number)}).int("QW_LEASE_SECONDS", 30)


def test_file_variable_missing_file_names_variable(tmp_path):
    missing = tmp_path / "nope"
    with _bad("DJANGO_SECRET_KEY_FILE") as excinfo:
        Env({"DJANGO_SECRET_KEY_FILE": str(missing)}).str("DJANGO_SECRET_KEY", "default")
    assert str(missing) in str(excinfo.value)


def test_file_variable_empty_falls_back_to_plain():
    assert Env({"QW_X_FILE": "", "QW_X": "plain"}).str("QW_X", "default") == "plain"


def test_env_defaults_to_process_environment(monkeypatch):
    monkeypatch.setenv("QW_TEST_CONFIG_PROBE", "17")
    assert Env().int("QW_TEST_CONFIG_PROBE", 0) == 17


# --- settings at start-up --------------------------------------------------------------------


def test_settings_with_bad_value_exit_naming_variable():
    # given the service's environment with a lease that is not a number
    env = dict(os.environ, QW_LEASE_SECONDS="abc")
    env.pop("QW_LEASE_SECONDS_FILE", None)
    code = (
        "import django, os; os.environ['DJANGO_SETTINGS_MODULE']='queueworker.settings'; "
        "django.setup()"
    )

    # when Django starts
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )

    # then it stops at once and says which variable is wrong
    assert proc.returncode != 0
    assert "ImproperlyConfigured" in proc.stderr
    assert "QW_LEASE_SECONDS must be an integer, got 'abc'" in proc.stderr


# --- the secret key --------------------------------------------------------------------------


def _load_settings(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    code = (
        "import os; os.environ['DJANGO_SETTINGS_MODULE']='queueworker.settings'; "
        "from django.conf import settings; print(settings.SECRET_KEY)"
    )
    return subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )


def _without_secret_key(**overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DJANGO_SECRET_KEY")}
    return {**env, **overrides}


def test_settings_without_secret_key_in_a_deployment_refuse_to_start(tmp_path):
    # given DEBUG off, a real database, and no DJANGO_SECRET_KEY
    env = _without_secret_key(DJANGO_DEBUG="false", QW_VAR_DIR=str(tmp_path))

    # when Django reads its settings
    proc = _load_settings(env)

    # then it stops, naming the variable and how to make a key
    assert proc.returncode != 0
    assert "ImproperlyConfigured: DJANGO_SECRET_KEY is not set" in proc.stderr
    assert "secrets.token_urlsafe(50)" in proc.stderr
    assert not (tmp_path / "secret-key").exists()


def test_settings_of_the_embedded_demo_make_a_private_key_once(tmp_path):
    # given the embedded demo: no DATABASE_URL, no key, DEBUG off
    env = _without_secret_key(DJANGO_DEBUG="false", QW_VAR_DIR=str(tmp_path))
    env.pop("DATABASE_URL")

    # when two processes start one after the other
    first, second = _load_settings(env), _load_settings(env)

    # then both use the one key made for this installation, readable by its owner only
    assert first.returncode == 0, first.stderr
    key = (tmp_path / "secret-key").read_text()
    assert first.stdout.strip() == second.stdout.strip() == key
    assert len(key) >= 50 and "insecure" not in key
    assert (tmp_path / "secret-key").stat().st_mode & 0o777 == 0o600


def test_local_secret_key_processes_starting_together_agree_on_one(tmp_path):
    path = tmp_path / "var" / "secret-key"

    with ThreadPoolExecutor(max_workers=8) as pool:
        keys = set(pool.map(lambda _: local_secret_key(path), range(32)))

    assert keys == {path.read_text()}
    assert [p.name for p in path.parent.iterdir()] == ["secret-key"]  # no temporary files left


def test_local_secret_key_empty_file_names_it(tmp_path):
    path = tmp_path / "secret-key"
    path.write_text("")

    with pytest.raises(ImproperlyConfigured, match="secret-key is empty"):
        local_secret_key(path)
