"""Loading a frozen segmenter: a TorchScript file, an ONNX file, or a factory plus checkpoint.

Loading policy: TorchScript files (``torch.jit.load``), ONNX files and checkpoints that
``torch.load(weights_only=True)`` accepts (state dicts: tensors in plain containers) load by
default. A file that holds other pickled Python objects (a whole ``torch.save(model)``
module) can run arbitrary code when unpickled, so it is refused unless the caller passes
``trust_checkpoint=True`` (the ``--trust-checkpoint`` flag); there is no silent fallback.

Every loader returns a :class:`LoadedModel` whose ``forward`` takes a ``(N, 3, h, w)`` float32
tensor on the chosen device and returns what the model returns (a tensor, a list/tuple, a dict
such as torchvision's ``{"out": ...}``, a Hugging Face ``ModelOutput`` with ``logits``; an ONNX
model's outputs by name); :func:`blda_posthoc.core.infer.select_output` picks the logits.
"""

from __future__ import annotations

import importlib
import inspect
import pickle
import sys
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from blda_posthoc.core.infer import Model
from blda_posthoc.errors import InputError
from blda_posthoc.outputs import file_digest

TORCHSCRIPT_EXTENSIONS = (".pt", ".pth", ".ts", ".jit")
ONNX_EXTENSIONS = (".onnx",)
ONNX_MISSING = "onnxruntime is not installed; install the extra: pip install 'blda-posthoc[onnx]'"


@dataclass
class LoadedModel:
    """A model ready to run.

    Attributes:
        spec: The ``--model`` value it came from.
        kind: ``torchscript``, ``onnx`` or ``factory``.
        forward: ``(N, 3, h, w)`` float32 input on the device to the model's output.
        autocast: Whether ``--precision`` (torch autocast) applies to it.
    """

    spec: str
    kind: str
    forward: Model
    autocast: bool = True


def load_model(
    spec: str,
    checkpoint: Path | None,
    device: torch.device,
    warn: Any = None,
    *,
    trust_checkpoint: bool = False,
    device_chosen: bool = True,
) -> LoadedModel:
    """Load a model from a ``--model`` spec.

    Args:
        spec: A TorchScript file (``.pt``, ``.pth``, ``.ts``, ``.jit``), an ONNX file
            (``.onnx``), or ``package.module:factory``.
        checkpoint: Weights for a factory model: a state dict, a dict holding one under
            ``"state_dict"`` or ``"model"``, or (only with ``trust_checkpoint``) a whole
            pickled module (used as is).
        device: Where the model runs.
        warn: Optional ``warn(message)`` for non-fatal notes.
        trust_checkpoint: Allow unpickling whole Python objects (which can run code) from a
            model file saved with ``torch.save(model)`` or such a checkpoint.
        device_chosen: Whether the user named ``device`` (False for ``--device auto``): only
            then is an ONNX model that falls back to CPU warned about.

    Returns:
        The loaded model, in eval mode, on ``device``.
    """
    path = Path(spec)
    if path.suffix.lower() in ONNX_EXTENSIONS:
        _no_checkpoint(spec, checkpoint)
        return load_onnx(path, device, warn if device_chosen else None)
    if path.suffix.lower() in TORCHSCRIPT_EXTENSIONS or path.exists():
        _no_checkpoint(spec, checkpoint)
        return load_torchscript(path, device, trust=trust_checkpoint)
    if ":" in spec:
        return load_factory(spec, checkpoint, device, warn, trust=trust_checkpoint)
    raise InputError(
        f"{spec}: not a model file (.pt/.pth/.ts/.jit TorchScript, .onnx) "
        "nor a package.module:factory spec"
    )


def _no_checkpoint(spec: str, checkpoint: Path | None) -> None:
    if checkpoint is not None:
        raise InputError(
            f"{checkpoint}: --checkpoint applies only to package.module:factory models"
        )


def _prepare(module: nn.Module, device: torch.device) -> nn.Module:
    module = module.to(device).eval()
    for param in module.parameters():
        param.requires_grad_(False)
    return module


def load_torchscript(path: Path, device: torch.device, *, trust: bool = False) -> LoadedModel:
    """Load a TorchScript file (or, only with ``trust``, a whole module saved with ``torch.save``).

    Args:
        path: The model file.
        device: Where the model runs.
        trust: Allow unpickling a whole module, which can run code (``--trust-checkpoint``).
    """
    if not path.is_file():
        raise InputError(f"{path}: no such model file")
    try:
        with warnings.catch_warnings():  # TorchScript is deprecated in torch, but users have it
            warnings.simplefilter("ignore", DeprecationWarning)
            module: nn.Module = torch.jit.load(str(path), map_location=device)
    except Exception as jit_error:  # noqa: BLE001 - torch raises several types for bad files
        module = _load_pickled_module(path, jit_error, trust)
    return LoadedModel(str(path), "torchscript", _prepare(module, device))


def _load_pickled_module(path: Path, jit_error: Exception, trust: bool) -> nn.Module:
    obj = _torch_load(path, trust, what="not a TorchScript model and")
    if isinstance(obj, nn.Module):
        return obj
    if isinstance(obj, Mapping):
        raise InputError(
            f"{path}: holds weights, not a model; use --model package.module:factory "
            f"--checkpoint {path}"
        )
    raise InputError(f"{path}: not a TorchScript model ({_first_line(jit_error)})")


TRUST_HINT = (
    "pass --trust-checkpoint only if you trust this file, or save a state dict "
    "(torch.save(model.state_dict(), ...)) and load it with --model package.module:factory "
    "--checkpoint"
)


def _torch_load(path: Path, trust: bool, what: str = "") -> Any:
    """``torch.load`` on CPU: weights only, or a full unpickle when ``trust`` is given.

    Raises:
        InputError: The file cannot be read, or it holds pickled Python objects (which can run
            code when loaded) and ``trust`` is False.
    """
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols it then reads
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not trust:
            lead = f"{what} " if what else ""
            raise InputError(
                f"{path}: {lead}holds pickled Python objects, not just weights; unpickling them "
                f"can run code, so it is refused: {TRUST_HINT}"
            ) from exc
    except Exception as exc:  # noqa: BLE001 - torch raises many types for bad files
        raise InputError(f"{path}: cannot read checkpoint ({_first_line(exc)})") from exc
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is bad input
        raise InputError(f"{path}: cannot read checkpoint ({_first_line(exc)})") from exc


def model_identity(spec: str, checkpoint: Path | None) -> str:
    """What identifies a model across runs (recorded for ``--resume``): file digests.

    Args:
        spec: The ``--model`` value.
        checkpoint: The ``--checkpoint`` file, or None.

    Returns:
        ``sha256:<hex>`` of a model file; for a factory, the spec plus the checkpoint's digest.
    """
    path = Path(spec)
    if path.is_file():
        return f"sha256:{file_digest(path)}"
    if checkpoint is not None and checkpoint.is_file():
        return f"{spec} checkpoint sha256:{file_digest(checkpoint)}"
    return spec


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def load_factory(
    spec: str,
    checkpoint: Path | None,
    device: torch.device,
    warn: Any = None,
    *,
    trust: bool = False,
) -> LoadedModel:
    """Build a model with ``package.module:factory`` and load ``checkpoint`` into it.

    The factory is called without arguments. If the checkpoint holds a whole pickled module
    (accepted only with ``trust``), that module is used as is and the factory is not called
    (its module is still imported so that the pickle can find its classes).
    """
    module_name, _, attr = spec.partition(":")
    factory = _import_factory(spec, module_name, attr)
    state: Any = None
    if checkpoint is not None:
        if not checkpoint.is_file():
            raise InputError(f"{checkpoint}: no such checkpoint file")
        state = _torch_load(checkpoint, trust)
        if isinstance(state, nn.Module):
            return LoadedModel(spec, "factory", _prepare(state, device))
    elif warn is not None:
        warn(f"{spec}: no --checkpoint given; using the weights the factory builds")
    try:
        model = factory()
    except Exception as exc:  # noqa: BLE001 - a failing user factory is bad input
        raise InputError(f"{spec}: the factory failed ({_first_line(exc)})") from exc
    if not isinstance(model, nn.Module):
        raise InputError(f"{spec}: the factory returned {type(model).__name__}, not a torch module")
    if state is not None:
        assert checkpoint is not None
        _load_state(model, state, checkpoint)
    return LoadedModel(spec, "factory", _prepare(model, device))


def _import_factory(spec: str, module_name: str, attr: str) -> Any:
    if not module_name or not attr:
        raise InputError(f"{spec}: expected package.module:factory")
    if "" not in sys.path and "." not in sys.path:
        sys.path.insert(0, "")  # like `python -m`: modules in the working folder are found
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise InputError(f"{spec}: cannot import {module_name} ({_first_line(exc)})") from exc
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        raise InputError(f"{spec}: {module_name} has no callable {attr!r}")
    if inspect.isclass(factory) and not issubclass(factory, nn.Module):
        raise InputError(f"{spec}: {attr} is a class but not a torch module")
    return factory


def _load_state(model: nn.Module, state: Any, checkpoint: Path) -> None:
    """Load a state dict (possibly nested under ``state_dict``/``model``, possibly DDP-prefixed)."""
    if isinstance(state, Mapping):
        for key in ("state_dict", "model"):
            if key in state and isinstance(state[key], Mapping):
                state = state[key]
                break
    if not isinstance(state, Mapping) or not all(isinstance(k, str) for k in state):
        raise InputError(f"{checkpoint}: not a state dict (got {type(state).__name__})")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    try:
        result = model.load_state_dict(dict(state), strict=False)
    except RuntimeError as exc:  # shape mismatches
        detail = str(exc).strip().splitlines()[-1].strip()
        raise InputError(f"{checkpoint}: does not fit the model ({detail})") from exc
    problems = []
    if result.missing_keys:
        problems.append(f"missing {_some(result.missing_keys)}")
    if result.unexpected_keys:
        problems.append(f"unexpected {_some(result.unexpected_keys)}")
    if problems:
        raise InputError(f"{checkpoint}: does not fit the model ({'; '.join(problems)})")


def _some(keys: list[str], limit: int = 3) -> str:
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_onnx(path: Path, device: torch.device, warn: Any = None) -> LoadedModel:
    """Load an ONNX model with onnxruntime (CUDA provider when ``device`` is CUDA)."""
    if not path.is_file():
        raise InputError(f"{path}: no such model file")
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise InputError(f"{path}: {ONNX_MISSING}") from exc
    providers: list[Any] = ["CPUExecutionProvider"]
    if device.type == "cuda":
        if "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": device.index or 0}))
        elif warn is not None:
            warn(f"{path}: onnxruntime has no CUDA provider (install onnxruntime-gpu); using CPU")
    try:
        session = ort.InferenceSession(str(path), providers=providers)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise InputError(f"{path}: cannot load ONNX model ({_first_line(exc)})") from exc
    return LoadedModel(str(path), "onnx", OnnxForward(session, device, path), autocast=False)


class OnnxForward:
    """Call an onnxruntime session like a torch model (first input; outputs by name).

    Args:
        session: An ``onnxruntime.InferenceSession``.
        device: Device of the returned tensors.
        path: Model file, for error messages.
    """

    def __init__(self, session: Any, device: torch.device, path: Path) -> None:
        self.session = session
        self.device = device
        self.path = path
        first = session.get_inputs()[0]
        self.input_name = first.name
        self.half = first.type == "tensor(float16)"
        self.output_names = [output.name for output in session.get_outputs()]

    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Run the session on ``(N, 3, h, w)`` input; return its outputs on the device, by name."""
        array = x.detach().to("cpu", torch.float16 if self.half else torch.float32).numpy()
        try:
            outputs = self.session.run(None, {self.input_name: array})
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise InputError(
                f"{self.path}: ONNX model failed on input {tuple(array.shape)} ({_first_line(exc)})"
            ) from exc
        try:
            tensors = [torch.from_numpy(np.asarray(out)).to(self.device) for out in outputs]
        except (TypeError, ValueError) as exc:
            raise InputError(f"{self.path}: ONNX model returned no numeric arrays ({exc})") from exc
        return dict(zip(self.output_names, tensors, strict=True))
