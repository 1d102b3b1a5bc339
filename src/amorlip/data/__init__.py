"""Data sources: embedded synthetic scenes, CSV, webdataset shards, Fashion-MNIST; streams and eval data.

Every module loads lazily (`amorlip.data.sources`, the torch-free registry, is importable without torch); the
names below are the public API.
"""
from __future__ import annotations

__all__ = [
    "Batch", "DataError", "DataStats", "RetrievalSplit", "TrainStream", "ZeroShotTask",
    "build_train_stream", "build_eval_data", "synthetic_eval_data",
    "SyntheticScenes", "synthetic_zeroshot_tasks", "synthetic_retrieval_split",
    "write_synthetic_csv", "write_synthetic_wds",
]

_LAZY = {
    **{name: "amorlip.data.types" for name in ("Batch", "DataError", "DataStats", "RetrievalSplit", "TrainStream",
                                               "ZeroShotTask")},
    "build_train_stream": "amorlip.data.loader",
    "build_eval_data": "amorlip.data.loader",
    "synthetic_eval_data": "amorlip.data.synthetic",
    "SyntheticScenes": "amorlip.data.synthetic",
    "synthetic_zeroshot_tasks": "amorlip.data.synthetic",
    "synthetic_retrieval_split": "amorlip.data.synthetic",
    "write_synthetic_csv": "amorlip.data.writers",
    "write_synthetic_wds": "amorlip.data.writers",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'amorlip.data' has no attribute {name!r}")
