"""`flm report`: the page is self-contained, has its sections, and renders in a real browser."""

import base64
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from flm_dist.cli.main import main
from flm_dist.config import load_config
from flm_dist.errors import UserError
from flm_dist.experiments.report import ReportConfig, run_report
from flm_dist.train.configs import PretrainConfig
from flm_dist.train.pretrain import run_pretrain

SMALL = ["model.hidden=16", "model.heads=2", "model.max_len=12", "model.flow_hidden=16",
         "model.flow_layers=2", "train.batch_size=64", "train.warmup_steps=2", "eval.batch_size=128"]
RUN_SECTIONS = ("metrics", "losses", "validation", "latent", "config")
CHROMIUM = next((shutil.which(name) for name in ("chromium", "chromium-browser", "google-chrome")
                 if shutil.which(name)), None)


@pytest.fixture(scope="module")
def tiny_run(tiny_data, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("report") / "run"
    run_pretrain(load_config(PretrainConfig, None, [f"data={tiny_data}", f"output={output}", *SMALL,
                                                    "scaling.workers=0", "train.epochs=3"]))
    return output


def assert_self_contained(page: str) -> None:
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.IGNORECASE)
    assert "http://" not in page and "https://" not in page
    assert "<script" not in page and "<link" not in page and "url(" not in page
    sources = re.findall(r'<img src="([^"]+)"', page)
    assert sources
    for source in sources:
        assert source.startswith("data:image/png;base64,")
        assert base64.b64decode(source.split(",", 1)[1]).startswith(b"\x89PNG\r\n\x1a\n")


def sections(page: str) -> set[str]:
    return set(re.findall(r'<section id="([a-z]+)">', page))


def screenshot(page: Path, png: Path, tmp_path: Path) -> np.ndarray:
    """Render `page` in headless Chromium; returns the screenshot's RGB values in [0, 1]."""
    if CHROMIUM is None:
        pytest.skip("no chromium binary on PATH (Debian: apt-get install chromium); the rendering check "
                    "needs a real browser")
    import matplotlib.image

    subprocess.run([CHROMIUM, "--headless", "--disable-gpu", "--no-sandbox", f"--user-data-dir={tmp_path / 'profile'}",
                    f"--screenshot={png}", "--window-size=1200,2000", page.resolve().as_uri()],
                   check=True, capture_output=True, timeout=120)
    pixels = matplotlib.image.imread(png)
    assert pixels.shape[:2] == (2000, 1200)
    return pixels[..., :3]


def assert_rendered(rgb: np.ndarray) -> None:
    not_white = (rgb < 0.94).any(axis=-1).mean()
    assert not_white > 0.15, f"only {not_white:.1%} of the screenshot is not white"
    assert rgb.std() > 0.08
    # The curves' lines are matplotlib's first colour (#1f77b4): the embedded PNGs were painted.
    line = np.abs(rgb - np.array([0x1F, 0x77, 0xB4]) / 255).max(axis=-1) < 0.06
    assert line.sum() > 100, f"{line.sum()} pixels of curve colour: the figures did not render"


@pytest.fixture(scope="module")
def run_page(tiny_run) -> Path:
    path = run_report(ReportConfig(directory=str(tiny_run)))
    assert path == tiny_run / "report.html"
    return path


def test_run_report_is_self_contained_with_every_section(tiny_run, run_page):
    page = run_page.read_text()
    assert_self_contained(page)
    assert sections(page) == set(RUN_SECTIONS)
    assert "title='test/ndcg@10/full'" in page and "title='valid/hr@10/full'" in page
    assert "loss curves: loss/cf, loss/flow, loss/fused, loss/seq, loss/total" in page
    assert "validation curves: valid/ndcg@10/full, valid/hr@10/full" in page
    summary = json.loads((tiny_run / "metrics.json").read_text())
    assert f"all {summary['data']['users']} test users" in page
    assert "model.hidden" in page and summary["config"]["data"] in page


def test_run_report_renders_in_chromium(run_page, tmp_path):
    assert_rendered(screenshot(run_page, tmp_path / "run.png", tmp_path))


def test_missing_data_dir_and_unfinished_run(tiny_run, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(tiny_run, moved)
    summary = json.loads((moved / "metrics.json").read_text())
    summary["config"]["data"] = str(tmp_path / "gone")
    (moved / "metrics.json").write_text(json.dumps(summary))
    page = run_report(ReportConfig(directory=str(moved), output=str(tmp_path / "out" / "page.html"))).read_text()
    assert "is missing, so no user can be embedded" in page
    assert sections(page) == set(RUN_SECTIONS) and page.count("<img ") == 2

    # Interrupted: no metrics.json; the history and config come from the newest checkpoint.
    (moved / "metrics.json").unlink()
    page = run_report(ReportConfig(directory=str(moved))).read_text()
    assert "no final evaluation yet" in page and "loss curves: loss/cf" in page
    assert "title='valid/ndcg@10/full'" in page and "title='test/ndcg@10/full'" not in page


def test_wrong_directory_is_one_line(tmp_path, capsys):
    with pytest.raises(UserError, match="neither a run directory"):
        run_report(ReportConfig(directory=str(tmp_path)))
    assert main(["report", str(tmp_path / "absent")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and error.count("\n") == 1 and "is not a directory" in error


@pytest.mark.slow
def test_tune_report_has_every_trial(tiny_run, tiny_data, tmp_path):
    from flm_dist.experiments.tune import TuneOptions, parse_space, run_tune

    base = {"pretrained": str(tiny_run), "data": tiny_data,
            "train": {"epochs": 2, "batch_size": 64, "warmup_steps": 1, "windows": "last"},
            "eval": {"batch_size": 128}}
    space = parse_space({"train.lr": {"loguniform": [1e-3, 1e-2]}}, base)
    output = tmp_path / "tune"
    best = run_tune(TuneOptions(output=str(output), space=space, base=base, samples=2, concurrent=2,
                                cpus_per_trial=1))
    page = run_report(ReportConfig(directory=str(output))).read_text()
    assert_self_contained(page)
    assert sections(page) == {"tune", *RUN_SECTIONS}
    trials = sorted(p.name for p in (output / "runs").iterdir() if (p / "config.json").is_file())
    assert len(trials) == 2 and all(trial in page for trial in trials)
    assert f"Best trial <b>{best['trial_id']}</b>" in page
    assert "<tr class='best'>" in page and "one line per trial" in page
    assert_rendered(screenshot(output / "report.html", tmp_path / "tune.png", tmp_path))
