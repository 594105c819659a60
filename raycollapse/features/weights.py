"""Where an extractor's weights come from: a hub tag in a local cache, a local file, or none.

``check_weights_available`` runs on the driver before any work. It never touches the network:
tags are looked up only in the caches the libraries themselves download into
(:class:`WeightCaches`: the Hugging Face hub cache through
``huggingface_hub.try_to_load_from_cache``, torch hub's ``checkpoints`` folder, open_clip's URL
folder, clean-fid's download folder), so a machine without internet gets an immediate error
that names the model, the places searched and how to supply the file, instead of a hang or a
half-finished job. ``"none"`` means the same architecture with random weights (a fixed seed); that is what the
tests use, since weights cannot be downloaded there.

Local files are read with ``safetensors`` or ``torch.load(weights_only=True)`` only: a checkpoint
can never run Python code on load. The one exception is clean-fid's own Inception file
(``inception-2015-12-05.pt``), which is a TorchScript archive and is opened with
``torch.jit.load``: TorchScript deserialisation executes no pickled Python, and this file is the
reference network for clean-fid's FID numbers.

A file must exist at the same path on every node that runs an embedding actor (shared storage,
or copied to each node); the driver checks its own view only.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from raycollapse.config.schema import FEATURE_NAMES as EXTRACTORS
from raycollapse.errors import UserInputError

DEFAULT_CLIP_MODEL = "ViT-B-32"
DEFAULT_CLIP_TAG = "laion2b_s34b_b79k"
DEFAULT_DINOV2_MODEL = "vit_small_patch14_dinov2.lvd142m"
INCEPTION_TAG = "clean-fid"
# clean-fid's TorchScript Inception (see WeightCaches.cleanfid for where it is looked up).
CLEANFID_FILE = "inception-2015-12-05.pt"
CLEANFID_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
# pytorch-fid's port of the same TensorFlow Inception (a plain state dict), in torch hub's cache.
PYTORCH_FID_FILE = "pt_inception-2015-12-05-6726825d.pth"
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
RANDOM_SEED = 0  # every random-weight extractor is built from this seed: identical on all actors

WeightFormat = Literal["random", "safetensors", "torch", "torchscript"]


@dataclass(frozen=True)
class ResolvedWeights:
    """The outcome of ``check_weights_available``: what ``build_extractor`` will load."""

    name: str  # extractor: pixel | clip | dinov2 | inception
    model: str  # architecture, e.g. "ViT-B-32" or "vit_small_patch14_dinov2.lvd142m"
    tag: str | None  # hub tag when resolved from one ("laion2b_s34b_b79k"); None for a file / none
    path: str | None  # the local file to load; None for random weights
    fmt: WeightFormat
    quick_gelu: bool = False  # open_clip tags trained with QuickGELU need it in the architecture

    @property
    def random(self) -> bool:
        return self.fmt == "random"

    def describe(self) -> str:
        """A short label stored in the embeddings' metadata (``raycollapse.pretrained``)."""
        if self.name == "pixel":
            return "none"
        if self.random:
            return f"none (random, seed {RANDOM_SEED})"
        return f"{self.tag} ({self.path})" if self.tag else str(self.path)


@dataclass(frozen=True)
class WeightCaches:
    """The local folders a hub tag is looked up in (nothing else is searched, nothing fetched).

    :meth:`default` gives the folders the libraries themselves download into; pass another
    ``WeightCaches`` to :func:`check_weights_available` to look elsewhere (e.g. a copy of the
    caches on shared storage).
    """

    hf_hub: Path  # Hugging Face hub cache (open_clip's and timm's hub tags)
    torch_checkpoints: Path  # torch hub's checkpoints folder (timm's URL fallback, pytorch-fid)
    clip_urls: Path  # open_clip's folder for weights it downloads from a URL
    cleanfid: tuple[Path, ...]  # folders searched for clean-fid's Inception file

    @classmethod
    def default(cls) -> WeightCaches:
        """The libraries' own folders, as their environment variables (HF_HUB_CACHE, TORCH_HOME,
        HOME) set them now."""
        import torch
        from huggingface_hub import constants

        return cls(
            hf_hub=Path(constants.HF_HUB_CACHE),
            torch_checkpoints=Path(torch.hub.get_dir()) / "checkpoints",
            clip_urls=Path(os.path.expanduser("~/.cache/clip")),
            # clean-fid downloads into "/tmp" on Linux/macOS (cleanfid/features.py); users often
            # keep the file in the working directory.
            cleanfid=(Path("/tmp"), Path.cwd()),
        )


def _hf_cached(caches: WeightCaches, repo_id: str, filename: str) -> str | None:
    """The path of a file in the local HF cache, or None. Pure file-system lookup, no network."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, filename, cache_dir=caches.hf_hub)
    return found if isinstance(found, str) and os.path.isfile(found) else None


def _looks_like_path(text: str) -> bool:
    return (
        "/" in text
        or os.sep in text
        or text.lower().endswith(WEIGHT_SUFFIXES)
        or text.startswith(".")
    )


def detect_format(path: str | Path) -> WeightFormat:
    """``safetensors``, ``torchscript`` (a zip with TorchScript code) or ``torch`` (torch.save)."""
    p = Path(path)
    with open(p, "rb") as f:
        head = f.read(16)
    # safetensors: 8-byte little-endian header length, then a JSON header starting with '{'.
    if len(head) > 8 and head[8:9] == b"{":
        return "safetensors"
    if head[:2] == b"PK":
        try:
            with zipfile.ZipFile(p) as zf:
                names = zf.namelist()
        except zipfile.BadZipFile:
            return "torch"
        if any(
            n.split("/", 1)[-1].startswith("code/") or n.endswith("/constants.pkl") for n in names
        ):
            return "torchscript"
    return "torch"


def _from_file(name: str, model: str, pretrained: str, hint: str) -> ResolvedWeights:
    p = Path(pretrained).expanduser()
    if not p.exists():
        raise UserInputError(
            f"{name} weights file '{p}' does not exist. {hint} "
            f"Or pass --pretrained none for random weights (tests only)."
        )
    if not p.is_file():
        raise UserInputError(
            f"{name} weights '{p}' is a folder; pass the weights file inside it. {hint}"
        )
    fmt = detect_format(p)
    if fmt == "torchscript" and name != "inception":
        raise UserInputError(
            f"{name} weights '{p}' is a TorchScript archive; only safetensors or plain state-dict files "
            f"(torch.save of tensors) are loaded. {hint}"
        )
    return ResolvedWeights(name, model, None, str(p.absolute()), fmt)


def check_weights_available(
    name: str,
    pretrained: str | None = None,
    *,
    clip_model: str = DEFAULT_CLIP_MODEL,
    dinov2_model: str = DEFAULT_DINOV2_MODEL,
    caches: WeightCaches | None = None,
) -> ResolvedWeights:
    """Resolve ``pretrained`` (tag, local file, ``"none"`` or ``None`` = the default tag) offline.

    Tags are looked up in ``caches`` (default :meth:`WeightCaches.default`). Raises
    ``UserInputError`` naming the model, where it looked and how to supply the file.
    """
    if name not in EXTRACTORS:
        raise UserInputError(f"unknown features '{name}'; choose one of: {', '.join(EXTRACTORS)}.")
    if name == "pixel":
        # Pixels need no weights; a pretrained value meant for another extractor is ignored.
        return ResolvedWeights("pixel", "pixel", None, None, "random")
    text = None if pretrained is None else str(pretrained).strip()
    found_in = caches or WeightCaches.default()
    if name == "clip":
        return _resolve_clip(clip_model, text, found_in)
    if name == "dinov2":
        return _resolve_dinov2(dinov2_model, text, found_in)
    return _resolve_inception(text, found_in)


def _resolve_clip(model: str, text: str | None, caches: WeightCaches) -> ResolvedWeights:
    # The file found must also fit the architecture: a dry run on meta tensors, here on the
    # driver, instead of a traceback from every embedding actor.
    from raycollapse.features.clip import check_clip_file

    resolved = _find_clip(model, text, caches)
    check_clip_file(resolved)
    return resolved


def _find_clip(model: str, text: str | None, caches: WeightCaches) -> ResolvedWeights:
    import open_clip

    if model not in open_clip.list_models():
        raise UserInputError(
            f"unknown open_clip model '{model}' (features.clip_model); valid names include: "
            f"{', '.join(m for m in open_clip.list_models() if m.startswith('ViT-B'))}."
        )
    tag = DEFAULT_CLIP_TAG if text is None and model == DEFAULT_CLIP_MODEL else text
    if tag is None:
        tags = open_clip.list_pretrained_tags_by_model(model)
        if not tags:
            raise UserInputError(
                f"open_clip model '{model}' has no pretrained tag; pass --pretrained FILE or none."
            )
        tag = tags[0]
    hint = (
        f"Download the open_clip weights for {model} on a machine with internet (e.g. "
        f"open_clip.create_model('{model}', pretrained='{DEFAULT_CLIP_TAG}') fills the Hugging Face "
        "cache, or fetch open_clip_pytorch_model.bin from the model's Hugging Face page) and pass "
        "--pretrained /path/to/the/file."
    )
    if tag.lower() == "none":
        return ResolvedWeights("clip", model, None, None, "random")
    if _looks_like_path(tag) or Path(tag).exists():
        return _from_file("clip", model, tag, hint)
    cfg = open_clip.get_pretrained_cfg(model, tag)
    if not cfg:
        valid = ", ".join(open_clip.list_pretrained_tags_by_model(model)) or "(none)"
        raise UserInputError(
            f"'{tag}' is neither a pretrained tag of open_clip {model} nor an existing file. "
            f"Tags for {model}: {valid}. Or pass --pretrained /path/to/file, or none."
        )
    quick = bool(cfg.get("quick_gelu", False))
    looked: list[str] = []
    hub = cfg.get("hf_hub", "")
    if hub:
        repo_id, filename = os.path.split(hub)
        candidates = (
            [filename]
            if filename
            else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]
        )
        if filename.endswith((".bin", ".pth")):
            candidates.insert(0, filename[:-4] + ".safetensors")
        for fn in candidates:
            found = _hf_cached(caches, repo_id, fn)
            if found:
                return ResolvedWeights("clip", model, tag, found, detect_format(found), quick)
            looked.append(f"{caches.hf_hub} ({repo_id}/{fn})")
        url_hint = f"https://huggingface.co/{repo_id}/resolve/main/{candidates[-1]}"
    else:
        url_hint = cfg.get("url", "")
    if cfg.get("url"):
        # open_clip's own URL cache; OpenAI's files there are TorchScript and are refused by
        # _from_file's format check below, with the hint to use the Hugging Face copy.
        cached = caches.clip_urls / os.path.basename(cfg["url"])
        if cached.is_file():
            resolved = _from_file("clip", model, str(cached), hint)
            return ResolvedWeights("clip", model, tag, resolved.path, resolved.fmt, quick)
        looked.append(str(cached))
    quick_note = (
        f" This tag was trained with QuickGELU: with a file, also set features.clip_model={model}-quickgelu."
        if quick
        else ""
    )
    raise UserInputError(
        f"CLIP weights {model} '{tag}' are not available on this machine (no download is attempted); "
        f"looked in: {'; '.join(looked)}. Download {url_hint} on a machine with internet, copy it here "
        f"(to the same path on every node) and pass --pretrained /path/to/{os.path.basename(url_hint)}, "
        f"or copy a Hugging Face cache that holds it to this machine.{quick_note} "
        "--pretrained none uses random weights (tests only)."
    )


def _resolve_dinov2(model: str, text: str | None, caches: WeightCaches) -> ResolvedWeights:
    import timm

    arch, _, model_tag = model.partition(".")
    if not timm.is_model(arch):
        raise UserInputError(
            f"unknown timm model '{arch}' (features.dinov2_model); e.g. {DEFAULT_DINOV2_MODEL}."
        )
    hint = (
        f"Download the timm weights for {model} on a machine with internet (e.g. "
        f"timm.create_model('{model}', pretrained=True) fills the Hugging Face cache, or fetch "
        f"https://huggingface.co/timm/{model}/resolve/main/model.safetensors) and pass --pretrained "
        "/path/to/model.safetensors."
    )
    if text is not None and text.lower() == "none":
        return ResolvedWeights("dinov2", model, None, None, "random")
    if text is not None and (_looks_like_path(text) or Path(text).exists()):
        return _from_file("dinov2", model, text, hint)
    tag = text or model_tag
    full = f"{arch}.{tag}" if tag else arch
    if not timm.list_pretrained(full):
        valid = ", ".join(timm.list_pretrained(f"{arch}*")) or "(none)"
        raise UserInputError(
            f"'{tag}' is neither a pretrained tag of timm {arch} nor an existing file; pretrained "
            f"names: {valid}. Or pass --pretrained /path/to/file, or none."
        )
    cfg = timm.models.get_pretrained_cfg(full)
    looked: list[str] = []
    hub_id = getattr(cfg, "hf_hub_id", None)
    if hub_id:
        for fn in ("model.safetensors", "pytorch_model.bin"):
            found = _hf_cached(caches, hub_id, fn)
            if found:
                return ResolvedWeights("dinov2", full, tag, found, detect_format(found))
            looked.append(f"{caches.hf_hub} ({hub_id}/{fn})")
    url = getattr(cfg, "url", None)
    if url:
        # timm's URL fallback and torch.hub's DINOv2 both download into torch hub's checkpoints.
        cached = caches.torch_checkpoints / os.path.basename(url)
        if cached.is_file():
            return ResolvedWeights("dinov2", full, tag, str(cached), detect_format(cached))
        looked.append(str(cached))
    source = f"https://huggingface.co/{hub_id}/resolve/main/model.safetensors" if hub_id else url
    raise UserInputError(
        f"DINOv2 weights {full} are not available on this machine (no download is attempted); "
        f"looked in: {'; '.join(looked)}. Download {source} on a machine with internet, copy it here "
        "(to the same path on every node) and pass --pretrained /path/to/model.safetensors, or copy a "
        "Hugging Face cache that holds it to this machine. --pretrained none uses random weights "
        "(tests only)."
    )


def _resolve_inception(text: str | None, caches: WeightCaches) -> ResolvedWeights:
    model = "inception-v3-fid"
    hint = (
        f"Download clean-fid's Inception ({CLEANFID_URL}) on a machine with internet and pass "
        f"--pretrained /path/to/{CLEANFID_FILE}."
    )
    if text is not None and text.lower() == "none":
        return ResolvedWeights("inception", model, None, None, "random")
    if text is not None and (_looks_like_path(text) or Path(text).exists()):
        return _from_file("inception", model, text, hint)
    if text is not None and text != INCEPTION_TAG:
        raise UserInputError(
            f"'{text}' is neither the Inception tag '{INCEPTION_TAG}' nor an existing file; "
            f"pass --pretrained {INCEPTION_TAG}, a file, or none."
        )
    candidates = [folder / CLEANFID_FILE for folder in caches.cleanfid]
    candidates.append(caches.torch_checkpoints / PYTORCH_FID_FILE)  # pytorch-fid's port
    for cand in candidates:
        if cand.is_file():
            return ResolvedWeights(
                "inception", model, INCEPTION_TAG, str(cand), detect_format(cand)
            )
    raise UserInputError(
        f"Inception weights ('{INCEPTION_TAG}', the TensorFlow FID Inception 2015-12-05) are not "
        f"available on this machine (no download is attempted); looked in: "
        f"{'; '.join(str(c) for c in candidates)}. {hint} (pytorch-fid's {PYTORCH_FID_FILE} works too.) "
        "--pretrained none uses random weights (tests only)."
    )


def load_state_dict_file(path: str | Path) -> dict:
    """A tensor state dict from safetensors or ``torch.load(weights_only=True)``; never pickled code.

    Unwraps ``{"state_dict": ...}`` / ``{"model": ...}`` containers and DDP's ``module.`` prefix.
    """
    import torch

    p = str(path)
    fmt = detect_format(p)
    if fmt == "safetensors":
        from safetensors.torch import load_file

        state = load_file(p, device="cpu")
    elif fmt == "torchscript":
        raise UserInputError(
            f"'{p}' is a TorchScript archive, not a state dict; save the weights with safetensors."
        )
    else:
        try:
            state = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as exc:  # UnpicklingError, RuntimeError for corrupt files, ...
            raise UserInputError(
                f"cannot load weights '{p}' safely ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
                "only safetensors files or torch.save'd dicts of tensors are accepted."
            ) from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not state:
        raise UserInputError(f"weights '{p}' hold no state dict of tensors.")
    if all(str(k).startswith("module.") for k in state):
        state = {str(k)[len("module.") :]: v for k, v in state.items()}
    return state
