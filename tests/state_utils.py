"""Comparing saved states (checkpoints, objective states) bit for bit, with the path of the first difference."""
import torch


def assert_same_state(a, b, path="state"):
    """Nested dicts / lists / tuples of tensors (and numpy arrays, plain values) equal bit for bit."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_same_state(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{path}[{i}]")
    elif hasattr(a, "shape"):  # numpy's RNG state
        assert (a == b).all(), path
    else:
        assert a == b, path
