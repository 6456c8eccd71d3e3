"""Whether a state dict read from a foreign file fits a model: missing, extra, wrong shapes."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch


def state_mismatch(
    expected: Mapping[str, torch.Tensor], found: Mapping[str, torch.Tensor],
    name: Callable[[str], str] = str,
) -> str | None:
    """The first way `found` does not fit `expected` (keys and shapes), as a phrase naming
    tensors by `name(key)`; None when it fits exactly."""
    missing = [name(k) for k in expected if k not in found]
    if missing:
        return f"missing {len(missing)} tensor(s): {', '.join(missing[:3])}"
    extra = [name(k) for k in found if k not in expected]
    if extra:
        return f"{len(extra)} unexpected tensor(s): {', '.join(extra[:3])}"
    for key, tensor in expected.items():
        if found[key].shape != tensor.shape:
            return (f"tensor {name(key)} has shape {list(found[key].shape)}, "
                    f"expected {list(tensor.shape)}")
    return None
