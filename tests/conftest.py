"""Shared fixtures: tiny random SD3 pipelines saved with save_pretrained and loaded back with
from_pretrained (the path a user's checkpoint takes), built once per test session."""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# The real CLIP BPE merges of SD3, present in the development workspace only (not in a user's clone).
CLIP_BPE = ROOT.parent / "shared" / "data" / "clip_bpe_simple_vocab_16e6.txt.gz"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _quiet_libraries():
    for name in ("diffusers", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        from diffusers.utils import logging as dlog

        dlog.set_verbosity_error()
        dlog.disable_progress_bar()
        from transformers.utils import logging as tlog

        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
    except Exception:  # pragma: no cover - only silences output
        pass


def _saved_pipeline(tmp_path_factory, name, config):
    from attention_map_diffusers.models.tiny import save_tiny_sd3_pipeline

    _quiet_libraries()
    path = tmp_path_factory.mktemp(name)
    save_tiny_sd3_pipeline(path, config)
    return str(path)


@pytest.fixture(scope="session")
def sd3_dir(tmp_path_factory):
    """A tiny SD3-medium-like checkpoint folder (plain MMDiT blocks, no qk-norm)."""
    from attention_map_diffusers.models.tiny import TinySD3Config

    return _saved_pipeline(tmp_path_factory, "tiny-sd3", TinySD3Config(num_layers=2))


@pytest.fixture(scope="session")
def sd35m_dir(tmp_path_factory):
    """A tiny SD3.5-medium-like checkpoint folder: MMDiT-X dual-attention blocks and RMS qk-norm."""
    from attention_map_diffusers.models.tiny import TinySD3Config

    cfg = TinySD3Config(num_layers=3, num_attention_heads=3, dual_attention_layers=(0, 1), qk_norm="rms_norm")
    return _saved_pipeline(tmp_path_factory, "tiny-sd35m", cfg)


def _load(pipeline_class: str, path, dtype=None):
    """``diffusers.<pipeline_class>.from_pretrained(path)`` in ``dtype`` (float32), quiet."""
    import diffusers
    import torch

    _quiet_libraries()
    pipe = getattr(diffusers, pipeline_class).from_pretrained(path, torch_dtype=dtype or torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_pipeline(path, dtype=None):
    return _load("StableDiffusion3Pipeline", path, dtype)


@pytest.fixture(scope="session")
def sd3_pipe(sd3_dir):
    return load_pipeline(sd3_dir)


@pytest.fixture(scope="session")
def sd35m_pipe(sd35m_dir):
    return load_pipeline(sd35m_dir)


@pytest.fixture(scope="session")
def flux_dir(tmp_path_factory):
    """A tiny FLUX.1-dev-like checkpoint folder: joint and single blocks, RoPE, guidance embedding."""
    from attention_map_diffusers.models.tiny_flux import save_tiny_flux_pipeline

    _quiet_libraries()
    path = tmp_path_factory.mktemp("tiny-flux")
    save_tiny_flux_pipeline(path)
    return str(path)


def load_flux_pipeline(path, dtype=None):
    return _load("FluxPipeline", path, dtype)


@pytest.fixture(scope="session")
def flux_pipe(flux_dir):
    return load_flux_pipeline(flux_dir)


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
CHROMEDRIVER = shutil.which("chromedriver")


def _browser_missing() -> str:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install selenium)"
    if not CHROMIUM or not CHROMEDRIVER:
        return "Chromium or chromedriver is absent (apt-get install -y chromium chromium-driver; .ci/run does it)"
    return ""


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium through selenium (skipped when it is missing, unless AMD_REQUIRE_BROWSER=1),
    with the flags this closed network needs (no background connections)."""
    why = _browser_missing()
    if why:
        if os.environ.get("AMD_REQUIRE_BROWSER") == "1":
            pytest.fail(f"AMD_REQUIRE_BROWSER=1 but {why}")
        pytest.skip(why)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--allow-file-access-from-files"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)

