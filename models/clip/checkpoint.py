"""Loading CLIP weights: OpenAI TorchScript archives, OpenAI/OpenCLIP state dicts and safetensors.

OpenAI's ``ViT-B-32.pt``-style files are archives written by ``torch.jit.save``: a zip holding
``data.pkl`` (the module tree, pickled), ``data/<n>`` (tensor storages), ``code/`` (TorchScript source) and
``constants.pkl``. Their weights are read without ``torch.jit.load`` and without running archived code:
``data.pkl`` is unpickled by :class:`_ArchiveUnpickler`, which rebuilds tensors and turns every
``__torch__.*`` module class into an inert attribute holder and refuses any other global. The
``__parameters__`` / ``__buffers__`` declarations in ``code/`` are read as text (never executed) to keep
only parameters and buffers. Everything else goes through :func:`edgefm.models.checkpoint.read_state_dict`
(``torch.load(weights_only=True)`` or safetensors).
"""

from __future__ import annotations

import collections
import dataclasses
import os
import pickle
import re
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from edgefm.runtime.errors import CheckpointError

from ..checkpoint import check_state_dict, read_state_dict
from .model import CLIP, CLIP_CONFIGS, ClipConfig, config_from_state_dict

# Buffers in OpenAI's archives and state dicts that are metadata, not weights (OpenAI's build_model drops
# them too). "attn_mask" appears when a model with a causal-mask buffer is traced or scripted.
_METADATA_KEYS = ("input_resolution", "context_length", "vocab_size")
# OpenCLIP's CustomTextCLIP keeps the text tower under "text."; these keys sit at the root in CLIP.
_TEXT_TOWER_KEYS = (
    "token_embedding.", "positional_embedding", "transformer.", "ln_final.", "text_projection",
)

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "HalfStorage": torch.float16, "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}
# TorchScript's pickler wraps typed lists/containers in these; rebuilding them is the identity.
_CONTAINER_BUILDERS = {
    "build_intlist": lambda data: data, "build_doublelist": lambda data: data,
    "build_boollist": lambda data: data, "build_tensorlist": lambda data: data,
    "restore_type_tag": lambda value, type_str: value,
}


def load_clip(path: str | os.PathLike[str], quick_gelu: bool | None = None) -> tuple[CLIP, ClipConfig, dict]:
    """Load a CLIP checkpoint into an eval-mode float32 :class:`CLIP` with strict key and shape checks.

    Args:
        path: an OpenAI archive (``ViT-B-32.pt``), or an OpenAI/OpenCLIP state dict (``.pt``/``.pth``/
            ``.bin``, optionally nested under ``"state_dict"`` and/or prefixed ``module.``), or
            ``.safetensors``. The variant is inferred from the tensor shapes.
        quick_gelu: the activation the weights were trained with. ``None`` decides: OpenAI files -> True,
            else a path containing "quickgelu" or "openai" -> True, else False (OpenCLIP's default).

    Returns:
        ``(model, config, info)``; ``info`` records ``file``, ``format`` ("openai-torchscript" |
        "state-dict" | "safetensors"), ``variant`` (a name of ``CLIP_CONFIGS`` or "custom"),
        ``quick_gelu``, ``quick_gelu_source``, ``stored_dtypes`` and ``dropped_keys``.

    Raises:
        CheckpointError: unreadable file, not a CLIP state dict, or missing/unexpected/misshapen keys.
    """
    path = Path(path)
    if is_torchscript_archive(path):
        fmt, sd = "openai-torchscript", read_torchscript_weights(path)
    else:
        fmt = "safetensors" if path.suffix == ".safetensors" else "state-dict"
        sd = read_state_dict(path)
    sd, dropped = _prepare(sd)
    use_quick_gelu, decided_by = _decide_quick_gelu(quick_gelu, fmt, dropped, path)
    model, config = clip_from_state_dict(sd, quick_gelu=use_quick_gelu, source=str(path))
    info = {
        "file": path.name, "format": fmt, "variant": variant_name(config),
        "quick_gelu": use_quick_gelu, "quick_gelu_source": decided_by,
        "stored_dtypes": sorted({str(v.dtype).replace("torch.", "") for v in sd.values()}),
        "dropped_keys": dropped,
    }
    return model, config, info


def clip_from_state_dict(state_dict: Mapping[str, torch.Tensor], quick_gelu: bool = True,
                         source: str = "state dict") -> tuple[CLIP, ClipConfig]:
    """An eval-mode float32 :class:`CLIP` holding ``state_dict``, strictly checked; shapes decide the variant.

    ``state_dict`` may be OpenAI's or OpenCLIP's (``module.`` / ``text.`` prefixes and OpenAI's metadata
    buffers are handled); ``source`` names it in error messages.
    """
    sd, _ = _prepare(state_dict)
    try:
        config = config_from_state_dict(sd, quick_gelu=quick_gelu)
    except (KeyError, IndexError) as exc:
        what = f"it has no key '{exc.args[0]}'" if isinstance(exc, KeyError) else "its tensors have other ranks"
        raise CheckpointError(
            f"Checkpoint '{source}' is not a CLIP checkpoint of the OpenAI architecture: {what} "
            f"(its first keys: {', '.join(list(sd)[:8]) or 'none'}). edgefm loads OpenAI "
            "archives and OpenCLIP state dicts of ModifiedResNet/ViT models with the OpenAI text tower."
        ) from None
    with torch.device("meta"):  # shapes only: the checkpoint provides every value
        model = CLIP(config)
    check_state_dict(model, sd, source, hint=lambda _: _hint(config))
    weights = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
    model.load_state_dict(weights, strict=True, assign=True)
    n = config.context_length
    model.attn_mask = torch.full((n, n), float("-inf")).triu_(1)  # the one non-checkpoint buffer
    return model.eval(), config


def variant_name(config: ClipConfig) -> str:
    """The registry name whose shapes equal ``config`` (activation aside), else "custom"."""
    for name, named in CLIP_CONFIGS.items():
        if dataclasses.replace(named, quick_gelu=config.quick_gelu) == config:
            return name
    return "custom"


def _decide_quick_gelu(flag: bool | None, fmt: str, dropped: list[str], path: Path) -> tuple[bool, str]:
    if flag is not None:
        return bool(flag), f"argument quick_gelu={bool(flag)}"
    if fmt == "openai-torchscript" or any(k in _METADATA_KEYS for k in dropped):
        return True, "OpenAI checkpoint (OpenAI trained CLIP with QuickGELU)"
    lowered = str(path).lower()
    for word in ("quickgelu", "openai"):
        if word in lowered:
            return True, f"file path contains '{word}'"
    return False, ("default GELU (OpenCLIP's default); pass quick_gelu=True if these weights were trained "
                   "with QuickGELU, as OpenAI's and OpenCLIP's '-quickgelu' models were")


def _hint(config: ClipConfig) -> str:
    return (f"Shapes were inferred as variant '{variant_name(config)}'. edgefm's CLIP covers OpenAI's "
            "ModifiedResNet and ViT towers with OpenAI's text transformer; OpenCLIP models with other towers "
            "(timm, Hugging Face text, SigLIP, CoCa) are not supported.")


def _prepare(sd: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Strip a DistributedDataParallel "module." prefix, lift a "text." tower to the root and drop the
    metadata buffers (returned as the second value); fill missing BatchNorm ``num_batches_tracked``."""
    sd = dict(sd)
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    if "text_projection" not in sd and "text.text_projection" in sd:
        sd = {k[len("text."):] if k.startswith("text.") and k[5:].startswith(_TEXT_TOWER_KEYS) else k: v
              for k, v in sd.items()}
    dropped = sorted(k for k in sd if k in _METADATA_KEYS or k.split(".")[-1] == "attn_mask")
    sd = {k: v for k, v in sd.items() if k not in dropped}
    # BatchNorm's step counter is unused in eval and torch's own loading tolerates its absence (files
    # saved before it existed lack it), so a missing one is filled rather than reported.
    for key in [k for k in sd if k.endswith(".running_mean")]:
        sd.setdefault(key[: -len("running_mean")] + "num_batches_tracked", torch.tensor(0))
    return sd, dropped


def is_torchscript_archive(path: str | os.PathLike[str]) -> bool:
    """True for a zip written by ``torch.jit.save`` (it has a ``constants.pkl`` record)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.split("/")[-1] == "constants.pkl" for name in archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


class _ModuleHolder:
    """Inert stand-in for a pickled TorchScript object: it keeps the attribute dict and does nothing else."""

    qualname = ""

    def __setstate__(self, state: object) -> None:
        self.state = state


class _StorageType:
    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype


class _ArchiveUnpickler(pickle.Unpickler):
    """Unpickles ``data.pkl`` of a TorchScript archive, allowing only tensors, containers and holders."""

    def __init__(self, data: bytes, reader: torch._C.PyTorchFileReader, source: Path) -> None:
        import io

        super().__init__(io.BytesIO(data))
        self._reader = reader
        self._source = source
        self._holders: dict[str, type] = {}

    def find_class(self, module: str, name: str) -> object:
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return torch._utils._rebuild_tensor_v2
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch.jit._pickle" and name in _CONTAINER_BUILDERS:
            return _CONTAINER_BUILDERS[name]
        if module == "__torch__" or module.startswith("__torch__."):
            qualname = f"{module}.{name}"
            if qualname not in self._holders:
                self._holders[qualname] = type(name, (_ModuleHolder,), {"qualname": qualname})
            return self._holders[qualname]
        raise CheckpointError(
            f"Checkpoint '{self._source}' references '{module}.{name}', which is neither a tensor nor a "
            "TorchScript module; edgefm only reads weights and will not unpickle it. Use an original "
            "OpenAI archive or a plain state dict (torch.save(model.state_dict(), path))."
        )

    def persistent_load(self, pid: tuple) -> torch.storage.TypedStorage:
        kind, storage_type, key, _location, numel = pid
        if kind != "storage" or not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        dtype = storage_type.dtype
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        raw = self._reader.get_storage_from_record(f"data/{key}", nbytes, torch.UntypedStorage)
        return torch.storage.TypedStorage(wrap_storage=raw._typed_storage()._untyped_storage, dtype=dtype,
                                          _internal=True)


def read_torchscript_weights(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """The parameters and buffers of a ``torch.jit.save`` archive as a flat state dict, without running it."""
    path = Path(path)
    try:
        reader = torch._C.PyTorchFileReader(str(path))
        records = reader.get_all_records()
        declared = _declared_tensors({r: reader.get_record(r) for r in records
                                      if r.startswith("code/") and r.endswith(".py")})
        root = _ArchiveUnpickler(reader.get_record("data.pkl"), reader, path).load()
    except CheckpointError:
        raise
    except Exception as exc:  # zip, pickle and storage errors of a damaged file
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else "no details"
        raise CheckpointError(
            f"Checkpoint '{path}' looks like a TorchScript archive but could not be read "
            f"({type(exc).__name__}: {detail}). "
            "The file is probably truncated or corrupt: download it again and compare its sha256."
        ) from exc
    if not isinstance(root, _ModuleHolder):
        raise CheckpointError(f"Checkpoint '{path}' is a TorchScript archive without a module in data.pkl.")
    sd: dict[str, torch.Tensor] = {}
    _flatten(root, "", declared, sd)
    return sd


_CLASS_DECL = re.compile(
    r"^class (\S+)\(Module\):\n  __parameters__ = \[([^\]]*)\]\n  __buffers__ = \[([^\]]*)\]", re.MULTILINE
)


def _declared_tensors(code_files: dict[str, bytes]) -> dict[str, set[str]]:
    """``{qualified class name: parameter and buffer names}`` from the archive's code (read as text)."""
    declared = {}
    for record, source in code_files.items():
        module = record[len("code/"):-len(".py")].replace("/", ".")
        for match in _CLASS_DECL.finditer(source.decode("utf-8", errors="replace")):
            names = re.findall(r'"([^"]+)"', match.group(2) + match.group(3))
            declared[f"{module}.{match.group(1)}"] = set(names)
    return declared


def _flatten(holder: _ModuleHolder, prefix: str, declared: dict[str, set[str]], out: dict) -> None:
    state = holder.state if isinstance(getattr(holder, "state", None), dict) else {}
    # Without a declaration (unexpected archive layout) every tensor attribute is taken; strict key
    # checks afterwards still reject anything that is not a weight of the model.
    names = declared.get(holder.qualname)
    for attr, value in state.items():
        if isinstance(value, torch.Tensor) and (names is None or attr in names):
            out[prefix + attr] = value
        elif isinstance(value, _ModuleHolder):
            _flatten(value, f"{prefix}{attr}.", declared, out)
