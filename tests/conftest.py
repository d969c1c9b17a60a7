"""Shared test set-up: the scripts live at the repo root, tests run on the CPU with few threads."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # tests are CPU-only, even on a GPU machine
