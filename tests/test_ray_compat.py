"""Private Ray APIs are used only on the pinned Ray: another version stops a job with one line
naming the pin, or skips a cosmetic use."""

import logging
import re
from pathlib import Path

import pytest
import ray

from flm_dist import ray_compat
from flm_dist.errors import UserError


def test_the_pin_is_the_one_in_pyproject():
    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert re.search(r'"ray\[[^\]]*\]==([^"]+)"', pyproject).group(1) == ray_compat.PINNED_RAY


def test_another_ray_fails_with_one_line_naming_the_pin(monkeypatch):
    monkeypatch.setattr(ray, "__version__", "2.61.0")
    with pytest.raises(UserError) as failure:
        ray_compat.dataset_execution_options()
    message = str(failure.value)
    assert "\n" not in message
    assert "Ray 2.60.0" in message and "pyproject.toml" in message and "Ray 2.61.0 is installed" in message


def test_another_ray_skips_cosmetic_log_quieting(monkeypatch, caplog):
    monkeypatch.setattr(ray, "__version__", "2.59.1")
    with caplog.at_level(logging.DEBUG, logger="flm_dist"):
        ray_compat.quiet_train_report_log()
    assert "per-report log lines stay on" in caplog.text


def test_the_pinned_ray_gets_its_private_api(monkeypatch):
    monkeypatch.setattr(ray, "__version__", ray_compat.PINNED_RAY)
    assert ray_compat.dataset_execution_options().__name__ == "_resolve_execution_options"
    ray_compat.quiet_train_report_log()
