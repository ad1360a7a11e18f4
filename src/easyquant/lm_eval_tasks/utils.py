"""Local data for easyquant's lm-eval tasks: jsonl files, labels in a separate file, offline.

A task YAML names ``dataset_path: json`` and its files (``dataset_kwargs``: ``data_files`` per
split and, where the labels live apart, ``labels_files``, one integer per line in the same
order) relative to a data directory, and sets ``custom_dataset: !function utils.load_local``.

Why a function rather than lm-eval's plain ``data_files``: lm-eval hands ``data_files`` to
``datasets.load_dataset`` as they are, so relative paths resolve against the working directory
(the YAML's own location is unknown to it), and it has no way to join labels kept in another
file. ``load_local`` resolves the paths, loads them with the same ``datasets`` json builder
(offline: no Hub access) and adds the ``label`` column.

The data directory, first found wins: ``--metadata '{"data_dir": "DIR"}'`` on the lm-eval
command line, the ``EASYQUANT_DATA_DIR`` environment variable, ``../shared/data`` beside the
easyquant checkout this file sits in, ``../shared/data`` from the working directory.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

DATA_DIR_ENV = "EASYQUANT_DATA_DIR"
# src/easyquant/lm_eval_tasks/utils.py -> the checkout's root is three folders up.
CHECKOUT = Path(__file__).resolve().parents[3]


def find_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    if data_dir:
        return Path(data_dir)
    if os.environ.get(DATA_DIR_ENV):
        return Path(os.environ[DATA_DIR_ENV])
    beside_checkout = CHECKOUT.parent / "shared" / "data"
    if beside_checkout.is_dir():
        return beside_checkout
    return Path("..") / "shared" / "data"


def read_labels(path: Path) -> list[int]:
    labels = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            labels.append(int(line))
        except ValueError:
            raise ValueError(f"{path}:{number}: a label must be an integer, got {line!r}") from None
    return labels


def load_local(
    data_files: dict[str, str],
    labels_files: dict[str, str] | None = None,
    data_dir: str | None = None,
    **metadata: Any,  # lm-eval passes the task metadata and model arguments too
) -> Any:
    """A ``datasets.DatasetDict`` of the task's local jsonl files, with labels joined."""
    import datasets

    root = find_data_dir(data_dir)
    labels_files = labels_files or {}
    paths = {split: root / name for split, name in data_files.items()}
    label_paths = {split: root / name for split, name in labels_files.items()}
    for path in [*paths.values(), *label_paths.values()]:
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: point lm-eval at the data directory with --metadata "
                f'\'{{"data_dir": "DIR"}}\' or {DATA_DIR_ENV}=DIR'
            )
    dataset = datasets.load_dataset("json", data_files={s: str(p) for s, p in paths.items()})
    for split, path in label_paths.items():
        labels = read_labels(path)
        if len(labels) != len(dataset[split]):
            raise ValueError(
                f"{path} has {len(labels)} labels but {paths[split]} has "
                f"{len(dataset[split])} examples"
            )
        dataset[split] = dataset[split].add_column("label", labels)
    return dataset
