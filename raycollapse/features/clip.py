"""CLIP image features: the open_clip image tower (default ViT-B-32, 512-d, 224 x 224, OpenAI
CLIP mean/std)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from raycollapse.errors import UserInputError
from raycollapse.features.base import TorchExtractor, load_error, resize_crop_normalise, seeded

if TYPE_CHECKING:  # a type only: weights.py calls check_clip_file, so no import back at run time
    import torch

    from raycollapse.features.weights import ResolvedWeights

__all__ = ["check_clip_file", "clip_extractor"]


def _build_clip(w: ResolvedWeights, device: str) -> tuple[torch.nn.Module, int, int, tuple, tuple]:
    import open_clip

    with seeded():
        model = open_clip.create_model(w.model, pretrained=None, force_quick_gelu=w.quick_gelu)
    if not w.random:
        _check_suffix(w)
        try:
            open_clip.load_checkpoint(model, str(w.path), strict=True, weights_only=True)
        except (RuntimeError, KeyError, ValueError) as exc:
            raise load_error(w, exc) from None
    pp = open_clip.get_model_preprocess_cfg(model)
    visual = model.visual  # only the image tower is kept: the text tower is ~40% of the memory
    del model
    size = visual.image_size
    size = int(size[0] if isinstance(size, tuple | list) else size)
    return visual, int(visual.output_dim), size, tuple(pp.get("mean", ())), tuple(pp.get("std", ()))


def clip_extractor(w: ResolvedWeights, *, device: str, amp: bool, **common: Any) -> TorchExtractor:
    """The CLIP image tower with weights ``w`` on ``device``; ``common``: dtype, normalize."""
    net, dim, size, mean, std = _build_clip(w, device)
    net = net.to(device).eval()
    prepare = resize_crop_normalise(size, mean, std, device)
    return TorchExtractor(
        "clip",
        w,
        net=net,
        forward=net,
        prepare=prepare,
        dim=dim,
        input_size=size,
        device=device,
        amp=amp,
        **common,
    )


def _check_suffix(w: ResolvedWeights) -> None:
    """open_clip picks its loader by the file's suffix: the content must match it."""
    is_st = str(w.path).endswith(".safetensors")
    if w.fmt == "safetensors" and not is_st:
        # A misnamed file would go to torch.load and fail.
        raise UserInputError(f"'{w.path}' is a safetensors file; rename it to end in .safetensors.")
    if w.fmt != "safetensors" and is_st:
        raise UserInputError(
            f"clip weights '{w.path}' are not a safetensors file (no safetensors header: a "
            "different or damaged file under that name); pass the open_clip weights file itself."
        )


def _meta_state(w: ResolvedWeights) -> dict[str, torch.Tensor]:
    """The file's tensors as meta tensors (names, shapes, dtypes only: nothing is read but the
    header of a safetensors file, and torch files are mapped, not loaded)."""
    import torch

    path = str(w.path)
    if w.fmt == "safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(path, "pt") as f:
                state = {}
                for k in f.keys():
                    sl = f.get_slice(k)
                    dtype = getattr(torch, _ST_DTYPES.get(sl.get_dtype(), "float32"))
                    state[k] = torch.empty(sl.get_shape(), dtype=dtype, device="meta")
                return state
        except SafetensorError as exc:
            raise UserInputError(
                f"clip weights '{path}' are a truncated or damaged safetensors file ({exc}); "
                "copy or download the file again."
            ) from None
    try:
        state = torch.load(path, map_location="meta", weights_only=True)
    except Exception as exc:  # UnpicklingError, RuntimeError for a damaged zip, EOFError, ...
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise UserInputError(
            f"cannot load weights '{path}' safely ({type(exc).__name__}: {first}); it is "
            "truncated, damaged or not a weights file: only safetensors files or torch.save'd "
            "dicts of tensors are accepted."
        ) from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if (
        not isinstance(state, dict)
        or not state
        or not all(isinstance(v, torch.Tensor) for v in state.values())
    ):
        raise UserInputError(f"clip weights '{path}' hold no state dict of tensors.")
    if next(iter(state)).startswith("module"):  # as open_clip's load_state_dict
        state = {k[7:]: v for k, v in state.items()}
    return state


# safetensors dtype names -> torch attribute names
_ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
              "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
              "BOOL": "bool"}  # fmt: skip


def check_clip_file(w: ResolvedWeights) -> None:
    """Check on the driver, before any work, that the weights file ``w`` fits ``w.model``.

    A dry run of ``open_clip.load_checkpoint`` on meta tensors (no memory, about a second): the
    same conversions of the state dict, then a strict ``load_state_dict`` of names and shapes.
    A truncated, damaged or foreign file, or one of another architecture, raises
    UserInputError naming the file (instead of a traceback on every embedding actor).
    """
    if w.random or w.path is None:
        return
    import open_clip

    _check_suffix(w)
    state = _meta_state(w)
    model = open_clip.create_model(
        w.model, pretrained=None, force_quick_gelu=w.quick_gelu, device="meta"
    )
    try:
        state = _as_open_clip_loads(model, dict(state))
    except (RuntimeError, KeyError, ValueError, TypeError, IndexError):
        pass  # a conversion that fails on this file: the strict load below names the mismatch
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except (RuntimeError, KeyError, ValueError, TypeError) as exc:
        raise load_error(w, exc) from None


def _as_open_clip_loads(model: torch.nn.Module, state: dict) -> dict:
    """The steps of ``open_clip.factory.load_checkpoint`` between reading and loading."""
    from open_clip import factory

    state = factory.convert_state_dict(model, state)
    if "positional_embedding" in state and not hasattr(model, "positional_embedding"):
        state = factory.convert_to_custom_text_state_dict(state)
    for key in ("logit_scale", "logit_bias"):
        ref = getattr(model, key, None)
        if key in state and ref is not None and ref.ndim != state[key].ndim:
            state[key] = state[key].reshape(ref.shape)
    if "logit_bias" not in state and getattr(model, "logit_bias", None) is not None:
        state["logit_bias"] = model.logit_bias
    state.pop("text.transformer.embeddings.position_ids", None)
    factory.resize_pos_embed(state, model)
    factory.resize_text_pos_embed(state, model)
    return state
