"""Model files: the export folder, the one reader of Lightning checkpoints, and loading weights.

Export folder (``stereo-t5/1``, written whole or not at all): ``config.json`` +
``model.safetensors`` (the T5Model body, LoRA merged), ``heads.safetensors`` (``head.*``,
``align_embed.*``, ``value_embed.*``, ``patch.*``) and ``stereo_t5.json`` (format, codec,
levels, pad/decoder-start token, head, align, frontend, patch_size, hparams); see
docs/formats.md.

Lightning checkpoints are pickles. ``read_checkpoint`` is the only place this project opens
one: ``torch.load(weights_only=True)``, which unpickles tensors, containers and primitives
only, plus the allow-list below; anything else is refused with one line, and nothing in the
file runs. ``init_from``, ``evaluate``, ``predict`` and ``fit --ckpt_path`` all go through it.
"""

from __future__ import annotations

import inspect
import json
import os
import pickle
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from lightning_fabric.utilities.data import AttributeDict
from safetensors.torch import load_file, save_file
from transformers import T5Model

from pipeline.codec import get_codec
from trainer.model.errors import ModelError
from trainer.model.estimator import Estimator
from trainer.model.heads import resolve_head
from trainer.model.lora import merged_body

if TYPE_CHECKING:
    from trainer.model.module import StereoT5

EXPORT_FORMAT = "stereo-t5/1"
META_NAME = "stereo_t5.json"
HEADS_NAME = "heads.safetensors"
EXTRA_PARTS = ("head", "estimator", "align_embed", "value_embed", "patch")  # in heads.safetensors
WEIGHT_PARTS = ("t5", *EXTRA_PARTS)
# What a Lightning checkpoint may hold beyond tensors, containers and primitives: hyperparameters
# saved as Lightning's AttributeDict. Everything else is refused.
SAFE_GLOBALS: list[Any] = [AttributeDict]
# hyperparameter names of releases before the head options moved into `head:`
_LEGACY_HEAD_KEYS = {
    "head_chunk": "chunk",
    "mixtures": "mixtures",
    "lpc_order": "order",
    "lpc_taps": "taps",
    "lpc_block": "refit_every",
    "lpc_forget": "forget",
}
# what a logistic head recorded without these options was: no cascade, no learned mixing
_BEFORE_CASCADE = {"cascade": [], "cascade_mu": [], "mix": False}


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """A Lightning checkpoint's contents, unpickled with ``weights_only=True`` and the
    allow-list (on CPU). Raises ModelError (one line) for anything else."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(
            f"{path}: missing: no checkpoint file here; pass a .ckpt or an export folder"
        )
    if not zipfile.is_zipfile(path):
        raise ModelError(
            f"{path}: not a checkpoint (torch.save writes a zip archive; this file is not one); "
            "pass a Lightning .ckpt or a StereoT5.save_pretrained folder"
        )
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ModelError(
            f"{path}: holds objects other than weights and plain values, refused unread "
            f"({_first_line(exc)}); load only checkpoints this trainer wrote"
        ) from None
    except Exception as exc:
        raise ModelError(
            f"{path}: not a readable checkpoint ({_first_line(exc)}); pass a Lightning .ckpt "
            "or a StereoT5.save_pretrained folder"
        ) from None
    if not isinstance(ckpt, dict):
        raise ModelError(f"{path}: not a Lightning checkpoint (a {type(ckpt).__name__})")
    return ckpt


def _first_line(exc: BaseException) -> str:
    """The first line of an exception's message (at most 160 characters), or its type."""
    text = str(exc).strip()
    return text.splitlines()[0][:160] if text else type(exc).__name__


def checkpoint_hparams(ckpt: dict[str, Any], path: Path) -> dict[str, Any]:
    """The StereoT5 constructor arguments a checkpoint records (older names translated)."""
    hparams = ckpt.get("hyper_parameters")
    if not hparams or "codec" not in hparams or "state_dict" not in ckpt:
        raise ModelError(f"{path}: not a StereoT5 Lightning checkpoint (no codec hyperparameter)")
    return current_hparams(dict(hparams))


def current_hparams(hparams: dict[str, Any]) -> dict[str, Any]:
    """Hyperparameters as this release names them: private keys dropped, and the flat head
    options and ``attn_block`` of earlier releases moved to ``head`` and ``attn_tile``, and a
    logistic head recorded before its cascade given the options it had (none)."""
    hparams = {k: v for k, v in hparams.items() if not k.startswith("_")}
    legacy = {new: hparams.pop(old) for old, new in _LEGACY_HEAD_KEYS.items() if old in hparams}
    if "attn_block" in hparams:
        hparams["attn_tile"] = hparams.pop("attn_block")
    recorded = hparams.get("head", "auto")
    if isinstance(recorded, str):
        options = resolve_head(recorded, get_codec(hparams["codec"]).levels)
        args = {k: v for k, v in options.init_args().items() if k not in _BEFORE_CASCADE}
        args.update({k: v for k, v in legacy.items() if k in args})
        recorded = {"class_path": options.to_dict()["class_path"], "init_args": args}
    if str(recorded.get("class_path", "")).endswith("LogisticOptions"):
        args = recorded.get("init_args") or {}
        recorded = {**recorded, "init_args": {**_BEFORE_CASCADE, **args}}
    hparams["head"] = recorded
    return hparams


def constructor_args(cls: type, hparams: dict[str, Any]) -> dict[str, Any]:
    """The hyperparameters ``cls.__init__`` takes (older releases recorded a few more)."""
    known = set(inspect.signature(cls.__init__).parameters) - {"self"}
    return {k: v for k, v in hparams.items() if k in known}


def model_from_checkpoint(path: str | os.PathLike) -> tuple[StereoT5, dict[str, Any]]:
    """A StereoT5 rebuilt from a Lightning checkpoint's hyperparameters with its weights loaded
    strictly (eval mode, CPU), and the checkpoint's datamodule hyperparameters ({} if none)."""
    from trainer.model.module import StereoT5

    path = Path(path)
    ckpt = read_checkpoint(path)
    hparams = checkpoint_hparams(ckpt, path)
    kwargs = constructor_args(StereoT5, hparams)
    # init_from was only the starting point of training: the checkpoint holds the weights
    model = StereoT5(**{**kwargs, "init_from": None, "compile": False})
    try:
        model.load_state_dict(ckpt["state_dict"], strict=True)
    except RuntimeError as exc:
        # torch's first line is only "Error(s) in loading state_dict for StereoT5:"
        lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
        detail = lines[1] if len(lines) > 1 and lines[0].endswith(":") else lines[0]
        raise ModelError(
            f"{path}: weights do not fit the model its hyperparameters describe ({detail}); it "
            "was written by another version of this code: load it there, or train again"
        ) from None
    return model.eval(), dict(ckpt.get("datamodule_hyper_parameters") or {})


# ----------------------------------------------------------------------------- export


def extra_state(model: StereoT5) -> dict[str, torch.Tensor]:
    """Weights outside the T5 body: ``head``, ``estimator``, ``align_embed``, ``value_embed``,
    ``patch``."""
    state = {}
    for prefix in EXTRA_PARTS:
        module = getattr(model, prefix)
        if module is not None:
            state.update({f"{prefix}.{k}": v for k, v in module.state_dict().items()})
    return state


def plain_state_dict(model: StereoT5) -> dict[str, torch.Tensor]:
    """Weights, LoRA merged: keys ``t5.*`` (a T5Model) and the extra parts."""
    state = {f"t5.{k}": v for k, v in merged_body(model.t5).state_dict().items()}
    state.update(extra_state(model))
    return state


def export_meta(model: StereoT5) -> dict[str, Any]:
    hparams = {k: v for k, v in model.hparams.items() if not k.startswith("_")}
    hparams.update(lora=None, init_from=None, compile=False)
    return {
        "format": EXPORT_FORMAT,
        "codec": model.codec.name,
        "levels": model.levels,
        "pad_token_id": model.pad_id,
        "decoder_start_token_id": model.pad_id,
        "head": model.head_kind,
        "align": bool(model.hparams.align),
        "frontend": "patch" if model.patch is not None else "sample",
        "patch_size": model.patch_size,
        "hparams": hparams,
    }


def save_pretrained(model: StereoT5, folder: str | os.PathLike) -> Path:
    """Write the export folder (replaced as a whole, never half-written)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    heads = {k: v.detach().cpu().contiguous() for k, v in extra_state(model).items()}
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        merged_body(model.t5).save_pretrained(tmp)
        save_file(heads, tmp / HEADS_NAME)
        (tmp / META_NAME).write_text(json.dumps(export_meta(model), indent=2, sort_keys=True))
        # mkdtemp makes 0700 and safetensors writes 0600: make it an ordinary folder
        tmp.chmod(0o755)
        for path in tmp.iterdir():
            path.chmod(0o644)
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def read_meta(folder: Path) -> dict[str, Any]:
    meta_path = folder / META_NAME
    if not meta_path.is_file():
        raise ModelError(f"{folder}: no {META_NAME}: not a StereoT5.save_pretrained folder")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != EXPORT_FORMAT:
        raise ModelError(f"{meta_path}: format {meta.get('format')!r}, expected {EXPORT_FORMAT}")
    return meta


# ----------------------------------------------------------------------------- init_from


def load_weights(model: StereoT5, path: str | os.PathLike) -> None:
    """Load a ``.ckpt`` or an export folder into the plain (not yet LoRA-wrapped) ``model``,
    after checking that codec, head and residual setting match."""
    path = Path(path)
    if not path.exists():
        raise ModelError(f"{path}: init_from does not exist")
    if path.is_dir():
        hparams = current_hparams(read_meta(path)["hparams"])
        body = T5Model.from_pretrained(path)
        state = {f"t5.{k}": v for k, v in body.state_dict().items()}
        state.update(load_file(path / HEADS_NAME))
    else:
        source, _ = model_from_checkpoint(path)
        hparams, state = dict(source.hparams), plain_state_dict(source)
    check_source(model, path, hparams)
    if model.estimator is not None:
        Estimator.fill_defaults(state, "estimator.")
    own = {k: v for k, v in model.state_dict().items() if k.split(".")[0] in WEIGHT_PARTS}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(k for k in state if k.split(".")[0] in WEIGHT_PARTS and k not in own)
    shapes = sorted(k for k in own if k in state and state[k].shape != own[k].shape)
    if missing or unexpected or shapes:
        first = (shapes + missing + unexpected)[0]
        raise ModelError(
            f"{path}: weights do not fit this model ({len(shapes)} shape mismatches, "
            f"{len(missing)} missing, {len(unexpected)} unexpected, e.g. {first}): "
            "use the d_model/layers/heads/align/patch_size it was trained with"
        )
    model.load_state_dict({k: state[k] for k in own}, strict=False)


def check_source(model: StereoT5, path: Path, hparams: dict[str, Any]) -> None:
    """Refuse weights trained with another codec, head module or residual setting."""
    source = get_codec(hparams["codec"])
    if source.name != model.codec.name:
        raise ModelError(
            f"{path}: trained with codec {source.name} ({source.levels} levels), this model "
            f"uses {model.codec.name} ({model.levels} levels): set codec: {source.name}"
        )
    theirs = resolve_head(hparams.get("head", "auto"), source.levels)
    if theirs.module is not model.head_options.module:
        raise ModelError(
            f"{path}: has a {theirs.name} head, this model a {model.head_kind} head: set "
            f"head: {theirs.name}"
        )
    residual = bool(hparams.get("residual"))
    if residual != model.residual:
        # Same shapes, other meaning: the weights would load and predict nonsense.
        raise ModelError(
            f"{path}: trained with residual: {str(residual).lower()}, this model has "
            f"residual: {str(model.residual).lower()}: set residual: {str(residual).lower()}"
        )
