"""Reading state dicts and loading them with strict, readable checks (shared by SAM, CLIP and DALL·E).

Only tensors are read: ``.pth`` / ``.pt`` / ``.bin`` (and any other suffix) through
``torch.load(weights_only=True)``, ``.safetensors`` through ``safetensors.torch.load_file``. Nothing
in a checkpoint can run code. Every failure is a :class:`CheckpointError` with one paragraph that
names the file and says what to do.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
from edgefm.runtime.errors import CheckpointError
from torch import nn

# Keys under which training scripts commonly nest the weights.
_WRAPPER_KEYS = ("state_dict", "model")
# How many keys an error message lists before it says "and N more".
_MAX_LISTED = 10

StateDict = dict[str, torch.Tensor]
HintFn = Callable[[Mapping[str, torch.Tensor]], str | None]


def sha256_file(path: str | os.PathLike[str], chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in ``chunk_size`` pieces (checkpoints can be several GB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def read_state_dict(path: str | os.PathLike[str]) -> StateDict:
    """Read a checkpoint file into ``{key: tensor}`` on the CPU.

    A top-level ``{"state_dict": {...}}`` or ``{"model": {...}}`` wrapper is unwrapped when the top level
    itself is not all tensors.

    Raises:
        CheckpointError: the file is missing, unreadable, truncated, holds pickled objects other than
            tensors, or is not a mapping of names to tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"Checkpoint file '{path}' does not exist or is not a file. Check the path (it is resolved "
            f"against the current directory '{Path.cwd()}') or download the checkpoint first."
        )
    if path.suffix == ".safetensors":
        obj = _load_safetensors(path)
    else:
        obj = _load_torch(path)
    return _as_state_dict(obj, path)


def _load_safetensors(path: Path) -> StateDict:
    try:
        from safetensors.torch import load_file
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise CheckpointError(
            f"Checkpoint '{path}' is a .safetensors file, which needs the package 'safetensors'. "
            "Install it with: pip install 'edgefm[export]'"
        ) from exc
    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # safetensors raises its own (Rust) error types
        raise _corrupt(path, "safetensors", exc) from exc


def _load_torch(path: Path) -> object:
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch reports refused objects as "Unsupported global"; anything else is a damaged stream
        # (random bytes give "Unsupported operand").
        if "unsupported global" not in str(exc).lower():
            raise _corrupt(path, "torch.load", exc) from exc
        raise CheckpointError(
            f"Checkpoint '{path}' contains pickled Python objects other than tensors, which edgefm does not "
            "load because unpickling them could run code (torch.load(weights_only=True) refused: "
            f"{_first_line(exc)}). Save only the weights, e.g. torch.save(model.state_dict(), path), or "
            "convert the file to .safetensors."
        ) from exc
    except Exception as exc:  # zip/EOF/runtime errors from a damaged file
        raise _corrupt(path, "torch.load", exc) from exc


def _corrupt(path: Path, reader: str, exc: BaseException) -> CheckpointError:
    return CheckpointError(
        f"Checkpoint '{path}' could not be read by {reader} ({type(exc).__name__}: {_first_line(exc)}). "
        "The file is probably truncated or corrupt (an interrupted download?) or not a checkpoint of "
        "this format: download it again and compare its sha256 with the published one."
    )


def _first_line(exc: BaseException) -> str:
    """The gist of an exception: its first sentence, at most 200 characters."""
    text = str(exc).strip()
    first = text.splitlines()[0].split(". ")[0].rstrip(".") if text else "no details"
    return first[:200]


def _as_state_dict(obj: object, path: Path) -> StateDict:
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"Checkpoint '{path}' holds a {type(obj).__name__}, not a state dict (a mapping of parameter "
            "names to tensors). Save the weights with torch.save(model.state_dict(), path)."
        )
    if not _all_tensors(obj):
        for key in _WRAPPER_KEYS:
            inner = obj.get(key)
            if isinstance(inner, Mapping) and _all_tensors(inner):
                obj = inner
                break
    bad = [str(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(
            f"Checkpoint '{path}' is not a plain state dict: entries {_listing(bad)} are not tensors "
            f"(top-level keys: {_listing([str(k) for k in obj])}). Pass a file that holds only the model "
            "weights, or one whose weights sit under a 'state_dict' or 'model' key."
        )
    return dict(obj)


def _all_tensors(d: Mapping) -> bool:
    return len(d) > 0 and all(isinstance(v, torch.Tensor) for v in d.values())


def _listing(keys: Iterable[str], limit: int = _MAX_LISTED) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f" ... and {len(keys) - limit} more" if len(keys) > limit else "")


def _shape(t: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in t.shape) + ")"


def load_strict(
    module: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    source: str,
    hint: HintFn | None = None,
    model_name: str | None = None,
) -> None:
    """Load ``state_dict`` into ``module`` after :func:`check_state_dict` found every key and shape right.

    Args:
        module: the model to fill; its persistent parameters and buffers define the expected keys.
        state_dict: ``{key: tensor}``, e.g. from :func:`read_state_dict`.
        source: the file name (or other description) to name in error messages.
        hint: optional ``state_dict -> sentence | None`` saying what to do instead (e.g. which variant
            the checkpoint looks like); used only when the check fails.
        model_name: how messages name the model (e.g. "the SAM vit_b model"); default its class name.
    """
    check_state_dict(module, state_dict, source, hint, model_name)
    module.load_state_dict(state_dict, strict=True)


def check_state_dict(
    module: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    source: str,
    hint: HintFn | None = None,
    model_name: str | None = None,
) -> None:
    """Raise one :class:`CheckpointError` unless ``state_dict`` has exactly the keys and shapes of ``module``.

    The message says what to do first (the hint's sentence, or generic advice), then lists the tensors
    whose shapes differ (both shapes), the missing keys and the unexpected keys; each list is truncated
    after ten entries with a count. ``module`` may live on the "meta" device, so a checkpoint can be
    checked before the real (possibly large) model is allocated. Arguments as in :func:`load_strict`.
    """
    expected = module.state_dict()
    mismatched = [
        f"{k}: checkpoint {_shape(v)} vs model {_shape(expected[k])}"
        for k, v in state_dict.items()
        if k in expected and tuple(v.shape) != tuple(expected[k].shape)
    ]
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    if not (mismatched or missing or unexpected):
        return
    problems = []
    if mismatched:
        problems.append(f"{len(mismatched)} tensors have other shapes ({_listing(mismatched)})")
    if missing:
        problems.append(f"{len(missing)} keys of the model are missing ({_listing(missing)})")
    if unexpected:
        problems.append(f"{len(unexpected)} keys are not in the model ({_listing(unexpected)})")
    advice = hint(state_dict) if hint is not None else None
    if not advice:
        advice = (
            "Check that the checkpoint belongs to this model family and variant, and that it was saved "
            "from the unwrapped model (no 'module.' prefixes)."
        )
    name = model_name or type(module).__name__
    raise CheckpointError(f"Checkpoint '{source}' does not fit {name}. {advice} Details: {'; '.join(problems)}.")
