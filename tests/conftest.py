import os
import sys
from pathlib import Path

# Tests import their helpers (dist_utils) from this folder.
sys.path.insert(0, str(Path(__file__).resolve().parent))

# Small, fast vLLM engines in-process on CPU; one thread per torch process on 2 cores.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
