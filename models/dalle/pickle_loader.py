"""Safe loading of OpenAI's released dVAE pickles (``encoder.pkl``, ``decoder.pkl``).

Those files are ``torch.save``d whole modules (classes ``dall_e.encoder.Encoder``, ``dall_e.utils.Conv2d``,
``torch.nn.Sequential`` ...). Unpickling them normally imports the ``dall_e`` package and lets the file
call any global it names. Here ``torch.load`` runs with a restricted pickle module instead:

- every class the file names is replaced by an inert stand-in (:class:`PickledObject`) that only records
  the state pickle hands it — no ``__init__``, ``__setstate__`` or other code of the original runs;
- the only real callables the file may reach are torch's tensor/parameter rebuild functions, storages,
  ``torch.device`` and the ``OrderedDict``/``set`` containers;
- any other global (``os.system``, ``builtins.eval``, ``subprocess.Popen`` ...) is refused with a
  :class:`CheckpointError` naming the file and the global, before anything is called.

A plain state dict (``torch.save(model.state_dict())`` or ``.safetensors``) with the same keys is accepted
too. The recorded module tree is then flattened into a state dict with the ``dall_e`` key names (equal to
ours), the sizes are read from the recorded attributes (``n_hid``, ``vocab_size`` ...), and our
:class:`~.dvae.Encoder` / :class:`~.dvae.Decoder` is built and loaded with ``strict=True``. Both the zip
format (torch >= 1.6) and the legacy format are read; TorchScript archives are refused.
"""

from __future__ import annotations

import collections
import os
import pickle
import types
import warnings
import zipfile
from collections.abc import Mapping
from typing import Any

import torch
from edgefm.runtime.errors import CheckpointError

from ..checkpoint import load_strict, read_state_dict
from .dvae import GROUP_WIDTHS, Decoder, DvaeConfig, Encoder, infer_dvae_config

# Classes a dall_e pickle may name; each becomes a recording stand-in.
_STAND_IN_CLASSES = frozenset(
    {
        "dall_e.encoder.Encoder",
        "dall_e.encoder.EncoderBlock",
        "dall_e.decoder.Decoder",
        "dall_e.decoder.DecoderBlock",
        "dall_e.utils.Conv2d",
        "torch.nn.modules.container.Sequential",
        "torch.nn.modules.activation.ReLU",
        "torch.nn.modules.linear.Identity",
        "torch.nn.modules.pooling.MaxPool2d",
        "torch.nn.modules.upsampling.Upsample",
    }
)

# Real callables a pickle may reach: tensor reconstruction and plain containers only.
_ALLOWED_GLOBALS: dict[str, Any] = {
    "collections.OrderedDict": collections.OrderedDict,
    "builtins.set": set,
    "builtins.frozenset": frozenset,
    "torch.device": torch.device,
    "torch._utils._rebuild_tensor": torch._utils._rebuild_tensor,
    "torch._utils._rebuild_tensor_v2": torch._utils._rebuild_tensor_v2,
    "torch._utils._rebuild_parameter": torch._utils._rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": torch._utils._rebuild_parameter_with_state,
}
_ALLOWED_STORAGES = frozenset(
    f"{kind}Storage"
    for kind in ("Float", "Double", "Half", "BFloat16", "Long", "Int", "Short", "Char", "Byte", "Bool")
)
# Protocol-2 pickles written by Python 3 name builtins by their Python 2 module.
_MODULE_ALIASES = {"__builtin__": "builtins", "copy_reg": "copyreg"}


class PickledObject:
    """Inert stand-in for an instance of a pickled class: records constructor args and state, nothing else."""

    pickled_name = "?"
    dump_patches = False  # read by torch's legacy loader when it compares saved class sources

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs, self.state = args, kwargs, None

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<pickled {self.pickled_name}>"


def _restricted_pickle_module(path: str) -> types.ModuleType:
    """A module usable as ``torch.load(pickle_module=...)`` whose Unpickler only knows the allowlist."""
    stand_ins: dict[str, type[PickledObject]] = {}

    class RestrictedUnpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            full = f"{_MODULE_ALIASES.get(module, module)}.{name}"
            if full in _ALLOWED_GLOBALS:
                return _ALLOWED_GLOBALS[full]
            if module == "torch" and name in _ALLOWED_STORAGES:
                return getattr(torch, name)
            if full in _STAND_IN_CLASSES:
                if full not in stand_ins:
                    stand_ins[full] = type(name, (PickledObject,), {"pickled_name": full})
                return stand_ins[full]
            raise CheckpointError(
                f"{path} asks to load the Python global '{full}', which is not part of a DALL·E dVAE "
                "checkpoint, so it was refused and nothing from the file was run. The file is not an "
                "official encoder.pkl/decoder.pkl or has been tampered with; download it again from "
                "https://cdn.openai.com/dall-e/ and check it."
            )

    def load(file: Any, **kwargs: Any) -> Any:
        return RestrictedUnpickler(file, **kwargs).load()

    module = types.ModuleType("edgefm_restricted_pickle")
    module.Unpickler = RestrictedUnpickler  # type: ignore[attr-defined]
    module.load = load  # type: ignore[attr-defined]
    return module


def _is_torchscript(path: str) -> bool:
    """TorchScript zips would be dispatched by torch.load to torch.jit.load, which runs their code."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.split("/", 1)[-1] == "constants.pkl" for name in archive.namelist())


def read_pickled(path: str | os.PathLike) -> Any:
    """Unpickle ``path`` through the restricted unpickler; returns the recorded root object.

    A pickled module comes back as a :class:`PickledObject` tree; a saved state dict as a mapping.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(
            f"dVAE checkpoint {path} does not exist; pass the path of encoder.pkl/decoder.pkl."
        )
    if _is_torchscript(path):
        raise CheckpointError(
            f"{path} is a TorchScript archive, not a pickled dall_e module; it is refused because loading "
            "it would run its code. Pass the original encoder.pkl/decoder.pkl."
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the legacy format warns that saved class sources differ
            root = torch.load(
                path, map_location="cpu", pickle_module=_restricted_pickle_module(path), weights_only=False
            )
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(
            f"{path} could not be read as a torch.save'd dVAE module ({type(exc).__name__}: {exc}). "
            "The file may be truncated or not a DALL·E checkpoint; download it again."
        ) from exc
    return root


def _module_state(obj: PickledObject, path: str, where: str) -> dict[str, Any]:
    if not isinstance(obj.state, dict):
        raise CheckpointError(
            f"{path}: the pickled module at '{where or 'root'}' has no attribute dictionary; "
            "the file is not a pickled dall_e module."
        )
    return obj.state


def flatten_state_dict(root: PickledObject, path: str = "<checkpoint>") -> dict[str, torch.Tensor]:
    """Walk a recorded module tree as nn.Module.state_dict would: parameters and persistent buffers."""
    out: dict[str, torch.Tensor] = {}

    def visit(obj: PickledObject, prefix: str) -> None:
        state = _module_state(obj, path, prefix.rstrip("."))
        skip = state.get("_non_persistent_buffers_set") or set()
        tensors = list((state.get("_parameters") or {}).items())
        tensors += [(k, v) for k, v in (state.get("_buffers") or {}).items() if k not in skip]
        for name, value in tensors:
            if value is None:
                continue
            if not isinstance(value, torch.Tensor):
                raise CheckpointError(f"{path}: '{prefix}{name}' is a {type(value).__name__}, not a tensor.")
            out[prefix + name] = value.detach()
        for name, child in (state.get("_modules") or {}).items():
            if child is None:
                continue
            if not isinstance(child, PickledObject):
                raise CheckpointError(f"{path}: submodule '{prefix}{name}' is not a pickled module.")
            visit(child, f"{prefix}{name}.")

    visit(root, "")
    return out


def _config_from(root: PickledObject, path: str, kind: str) -> DvaeConfig:
    state = _module_state(root, path, "")
    channels = "input_channels" if kind == "encoder" else "output_channels"
    names = ["n_hid", "n_blk_per_group", "vocab_size", channels] + (["n_init"] if kind == "decoder" else [])
    missing = [n for n in names if not isinstance(state.get(n), int)]
    if missing:
        raise CheckpointError(
            f"{path}: the pickled {kind} lacks the integer attribute(s) {', '.join(missing)}; "
            "it is not a dall_e dVAE module."
        )
    groups = state.get("group_count", len(GROUP_WIDTHS))
    if groups != len(GROUP_WIDTHS):
        raise CheckpointError(
            f"{path}: group_count {groups} is not supported (the dVAE has {len(GROUP_WIDTHS)} groups)."
        )
    return DvaeConfig(**{n: state[n] for n in names})


def _state_dict_and_config(
    path: str, kind: str, root_class: str
) -> tuple[dict[str, torch.Tensor], DvaeConfig]:
    if path.endswith(".safetensors"):
        root: Any = read_state_dict(path)
    else:
        root = read_pickled(path)
    if isinstance(root, PickledObject):
        if root.pickled_name != root_class:
            raise CheckpointError(
                f"{path} holds a pickled {root.pickled_name}, but a {root_class} was expected; "
                f"pass the dVAE {kind} file ({kind}.pkl)."
            )
        return flatten_state_dict(root, path), _config_from(root, path, kind)
    # A plain state dict (ours or dall_e's, same keys): sizes come from the shapes.
    if not isinstance(root, Mapping) or not all(isinstance(v, torch.Tensor) for v in root.values()):
        raise CheckpointError(
            f"{path} holds a {type(root).__name__}, neither a pickled dall_e {kind} module nor a state dict."
        )
    try:
        return dict(root), infer_dvae_config(dict(root), kind)
    except (KeyError, IndexError) as exc:
        raise CheckpointError(
            f"{path} is a state dict without the dVAE {kind} key {exc}; pass the dVAE {kind} weights."
        ) from exc


def _load(path: str | os.PathLike, kind: str, root_class: str) -> torch.nn.Module:
    path = os.fspath(path)
    state_dict, config = _state_dict_and_config(path, kind, root_class)
    model = Encoder(config) if kind == "encoder" else Decoder(config)
    load_strict(model, {k: v.float() for k, v in state_dict.items()}, path)
    return model.eval()


def load_dvae_encoder(path: str | os.PathLike) -> Encoder:
    """Our :class:`Encoder` from a pickled ``dall_e.encoder.Encoder`` (encoder.pkl) or its state dict."""
    return _load(path, "encoder", "dall_e.encoder.Encoder")  # type: ignore[return-value]


def load_dvae_decoder(path: str | os.PathLike) -> Decoder:
    """Our :class:`Decoder` from a pickled ``dall_e.decoder.Decoder`` (decoder.pkl) or its state dict."""
    return _load(path, "decoder", "dall_e.decoder.Decoder")  # type: ignore[return-value]
