"""hf:// models: the token and the cache come from the pod's environment (HF_TOKEN, HF_HUB_CACHE).

No network here: the test lays out a Hub cache the way huggingface_hub writes one and proves a
stage loads the model from it with the Hub unreachable (HF_HUB_OFFLINE=1), which is what a retry
finds after the first attempt downloaded it into <outputDir>/hf-cache (the operator sets HF_HUB_CACHE).
"""

from __future__ import annotations

import shutil
import subprocess
import sys

from .stage_runs import subprocess_env

LOAD = """
import huggingface_hub
from trainer.modeling import load_tokenizer, resolve_model_source
tokenizer = load_tokenizer(resolve_model_source("hf://acme/tiny-chat@v1"))
print(type(tokenizer).__name__, huggingface_hub.get_token())
"""


def test_an_hf_model_already_in_the_hub_cache_loads_without_network_and_the_token_comes_from_hf_token(
        tmp_path, tiny_model_dir):
    cache = tmp_path / "hf-cache"
    repo = cache / "models--acme--tiny-chat"
    snapshot = repo / "snapshots" / ("0" * 40)
    shutil.copytree(tiny_model_dir, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "v1").write_text("0" * 40)
    env = subprocess_env(HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1", HF_TOKEN="hf_from_the_pod_secret")
    result = subprocess.run([sys.executable, "-c", LOAD], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-1] == "hf_from_the_pod_secret"

    env["HF_HUB_CACHE"] = str(tmp_path / "empty-cache")
    missing = subprocess.run([sys.executable, "-c", LOAD], env=env, capture_output=True, text=True, timeout=120)
    assert missing.returncode != 0, "without the cache, offline loading must fail: the cache is what was used"
