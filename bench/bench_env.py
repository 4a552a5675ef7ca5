"""Imported first by benchmarks that start worker processes: model hubs offline, idle OpenMP threads that sleep
instead of spinning (they would steal the measured process's cores), and this checkout and bench/ importable."""
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
HERE = Path(__file__).resolve().parent
for path in (str(HERE.parent), str(HERE)):
    sys.path.insert(0, path)
