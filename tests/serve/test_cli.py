"""`pue-serve`'s refusals before any work: no key beyond loopback, no plain key option, the serve extra."""

from __future__ import annotations

import sys

import pytest
from typer.testing import CliRunner

from pue.cli.serve_app import app

runner = CliRunner()


def invoke(*args: str, env: dict[str, str] | None = None):
    return runner.invoke(app, list(args), env={"PUE_API_KEY": "", **(env or {})})


def test_binding_beyond_loopback_needs_a_key(tmp_path):
    result = invoke(str(tmp_path / "no-bundle"), "--host", "0.0.0.0")
    assert result.exit_code == 1, result.output
    assert "no API key is set" in result.output and "--api-key-file" in result.output


def test_a_key_is_never_a_plain_option(tmp_path):
    assert invoke(str(tmp_path), "--api-key", "sk-123").exit_code == 2


def test_an_empty_key_file_is_refused(tmp_path):
    key = tmp_path / "key"
    key.write_text("\n")
    result = invoke(str(tmp_path / "no-bundle"), "--api-key-file", str(key))
    assert result.exit_code == 1 and "is empty" in result.output


def test_a_key_from_the_environment_allows_a_wildcard_bind_then_the_bundle_is_checked(tmp_path):
    result = invoke(str(tmp_path / "no-bundle"), "--host", "0.0.0.0", env={"PUE_API_KEY": "k"})
    assert result.exit_code == 1 and "no API key" not in result.output and "no-bundle" in result.output


def test_without_the_serve_extra_it_refuses_first(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "fastapi", None)
    result = invoke(str(tmp_path / "no-bundle"))
    assert result.exit_code == 1
    assert 'pip install "pue[serve]"' in result.output


@pytest.mark.parametrize("option", ["--max-batch", "--max-queue", "--max-inputs"])
def test_limits_must_be_positive(tmp_path, option):
    assert invoke(str(tmp_path), option, "0").exit_code == 2
