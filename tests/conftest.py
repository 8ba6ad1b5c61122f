"""Shared pytest setup: the repo root on sys.path, one torch thread (tiny matrices gain nothing from more)."""
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Test models are tiny: one thread avoids thread-pool overhead and contention on small CI machines.
torch.set_num_threads(1)
