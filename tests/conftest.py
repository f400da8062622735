"""Shared pytest set-up: offline hub, one torch thread per test process (the CI machine has 2 shared cores)."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
