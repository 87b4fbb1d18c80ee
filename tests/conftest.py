import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# in-process servers: vLLM's worker inside its engine process (one process to start, not two);
# subprocess servers drop this and run vLLM as deployed (tests/server/conftest.py)
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
