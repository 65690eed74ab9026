"""Reading a weights file someone else wrote, without running any of its code.

``.safetensors`` is read through safetensors; anything else through
``torch.load(..., weights_only=True)``, which refuses a pickle that names a class (a saved
``nn.Module``, a custom object), because unpickling it would run code chosen by whoever wrote the
file. Used for imported fine-tunes and their head files.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointRefused

# Wrappers other trainers put around a state dict; the first one present is unwrapped.
WRAPPER_KEYS = ("state_dict",)
DDP_PREFIX = "module."


def read_tensors(path: str | Path, what: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` or weights-only ``torch.save`` file, flat by key.

    Nothing in the file is executed: a pickle naming a class (a saved ``nn.Module``, a custom
    object) is refused, because unpickling it would run code chosen by whoever wrote the file.

    Raises:
        CheckpointRefused: missing or unreadable file, code needed to load it, or no tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointRefused(f"{what} {path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            loaded: Any = load_file(str(path))
        except Exception as exc:  # safetensors raises its own error types for bad framing
            raise CheckpointRefused(
                f"{what} {path}: not a readable safetensors file ({exc})"
            ) from None
    else:
        import pickle

        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            named = re.search(r"GLOBAL ([\w.]+)", str(exc))
            why = f"it names {named.group(1)}" if named else "it is not a plain weights pickle"
            raise CheckpointRefused(
                f"{what} {path} needs code execution to load ({why}); only tensors and plain "
                "containers are read (torch.load with weights_only=True). Save the weights with "
                "`torch.save(model.state_dict(), ...)` or as .safetensors"
            ) from None
        except (RuntimeError, EOFError, OSError, ValueError) as exc:
            raise CheckpointRefused(f"{what} {path}: not a readable torch file ({exc})") from None
    for key in WRAPPER_KEYS:
        if isinstance(loaded, Mapping) and isinstance(loaded.get(key), Mapping):
            loaded = loaded[key]
    if not isinstance(loaded, Mapping):
        raise CheckpointRefused(f"{what} {path} holds a {type(loaded).__name__}, not a state dict")
    tensors = {str(k): v for k, v in loaded.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointRefused(f"{what} {path} holds no tensors")
    if all(k.startswith(DDP_PREFIX) for k in tensors):
        tensors = {k.removeprefix(DDP_PREFIX): v for k, v in tensors.items()}
    return tensors
