"""lm-evaluation-harness task YAMLs that read local files (offline); see utils.py.

``easyquant lm-eval`` passes this folder to lm-eval's ``--include_path``.
"""

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent
