"""Training checkpoints as safetensors + JSON: nothing is unpickled on load.

Layout of one checkpoint, `<root>/step_000012/`:

    meta.json                   step, the model/optimizer names, `extra` (policy version, sampler state,
                                MLflow run id, ...)
    <model>.safetensors         a model state dict
    <model>.optim.safetensors   an optimizer's tensors, keys like `state.0.exp_avg`
    <model>.optim.json          the rest of the optimizer state dict (param_groups, python numbers), with
                                `{"__tensor__": key}` where a tensor was
    rng.safetensors, rng.json   torch CPU (and CUDA) RNG states as tensors; python and numpy RNG as JSON

A checkpoint is written into a `.tmp_step_*` directory next to the final one and renamed into place
only once complete, so a crash mid-save never leaves a half checkpoint under a `step_*` name.
Assumes one writer per root directory (the driver): a save removes temp directories that earlier,
crashed saves left behind.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import random
import re
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"^step_(\d+)$")
_TMP_PREFIX = ".tmp_step_"
_OLD_PREFIX = ".old_step_"
_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")
_RESERVED_NAMES = {"meta", "rng"}


@dataclass
class Checkpoint:
    path: str
    step: int
    models: dict[str, dict[str, torch.Tensor]]
    optimizers: dict[str, dict]  # each one a state dict `torch.optim.Optimizer.load_state_dict` accepts
    rng: dict | None
    extra: dict = field(default_factory=dict)


# -- encoding: nested python structures <-> (JSON, flat tensor dict) --------------------------------

def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def _encode(obj: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Turn `obj` into JSON data, moving each tensor into `tensors` under its dotted path.

    Tuples, non-string dict keys (optimizer state is keyed by param index) and numpy arrays are tagged
    so `_decode` rebuilds the exact types: `random.setstate` insists on tuples, for one.
    """
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj
        return {"__tensor__": path}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, _join(path, i), tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, _join(path, i), tensors) for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: _encode(v, _join(path, k), tensors) for k, v in obj.items()}
        return {"__items__": [[_encode(k, "", {}), _encode(v, _join(path, k), tensors)] for k, v in obj.items()]}
    raise TypeError(f"cannot checkpoint {type(obj).__name__} at {path!r}")


def _decode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tensor__" in obj:
        return tensors[obj["__tensor__"]]
    if "__ndarray__" in obj:
        return np.array(obj["__ndarray__"], dtype=obj["dtype"])
    if "__tuple__" in obj:
        return tuple(_decode(v, tensors) for v in obj["__tuple__"])
    if "__items__" in obj:
        return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__items__"]}
    return {k: _decode(v, tensors) for k, v in obj.items()}


def _savable(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU tensors that share no storage (safetensors refuses shared storage).

    Tied weights (embedding and LM head) and views of a larger buffer are cloned; a tensor that owns
    its storage is saved without a copy.
    """
    out, seen = {}, set()
    for key, t in tensors.items():
        t = t.detach()
        storage = t.untyped_storage()
        storage_id = (t.device, storage.data_ptr())
        is_view = storage.nbytes() != t.numel() * t.element_size()
        if storage_id in seen or is_view:
            t = t.clone()
        else:
            seen.add(storage_id)
        out[key] = t.contiguous().cpu()
    return out


def _write_json(path: Path, obj: Any, indent: int | None = None) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=indent)


def _write_structure(directory: Path, stem: str, obj: Any) -> None:
    """`<stem>.safetensors` for the tensors in `obj`, `<stem>.json` for everything else."""
    tensors: dict[str, torch.Tensor] = {}
    structure = _encode(obj, "", tensors)
    save_file(_savable(tensors), str(directory / f"{stem}.safetensors"))
    _write_json(directory / f"{stem}.json", structure)


def _read_structure(directory: Path, stem: str, device: str) -> Any:
    tensors = load_file(str(directory / f"{stem}.safetensors"), device=device)
    with open(directory / f"{stem}.json") as f:
        return _decode(json.load(f), tensors)


def _check_name(name: str) -> None:
    if not _NAME.match(name) or name in _RESERVED_NAMES:
        raise ValueError(f"checkpoint entry name must match {_NAME.pattern} and not be one of "
                         f"{sorted(_RESERVED_NAMES)}, got {name!r}")


# -- atomic directory publish ------------------------------------------------------------------------

def _fsync_tree(directory: Path) -> None:
    for entry in directory.iterdir():
        fd = os.open(entry, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _publish(tmp: Path, final: Path) -> None:
    """Rename a finished temp directory to `final`, replacing what was there.

    rename(2) cannot replace a non-empty directory, so an existing one is first moved aside; if we die
    in between, `final` is missing and the previous checkpoint is what `latest_checkpoint` finds.
    """
    _fsync_tree(tmp)
    old = None
    if final.exists():
        old = final.parent / f"{_OLD_PREFIX}{final.name}_{uuid.uuid4().hex[:8]}"
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# -- public API --------------------------------------------------------------------------------------

def save_checkpoint(
    root_dir: str | os.PathLike,
    step: int,
    *,
    models: dict[str, dict[str, torch.Tensor]],
    optimizers: dict[str, dict],
    rng: dict | None = None,
    extra: dict | None = None,
    keep_last: int = 2,
) -> str:
    """Write `root_dir/step_<step:06d>/` atomically, then keep only the newest `keep_last` checkpoints
    (`keep_last <= 0` keeps all). `rng` is what `capture_rng_state()` returns. Returns the path.
    """
    root = Path(root_dir)
    root.mkdir(parents=True, exist_ok=True)
    for name in (*models, *optimizers):
        _check_name(name)
    extra_tensors: dict[str, torch.Tensor] = {}
    meta = {
        "format_version": FORMAT_VERSION,
        "step": int(step),
        "models": sorted(models),
        "optimizers": sorted(optimizers),
        "has_rng": rng is not None,
        "extra": _encode(dict(extra or {}), "extra", extra_tensors),
    }
    if extra_tensors:
        raise TypeError(f"`extra` must be JSON data; pass tensors as a model state dict: {sorted(extra_tensors)}")

    tmp = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=root))
    final = root / f"step_{int(step):06d}"
    try:
        for name, state_dict in models.items():
            non_tensors = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
            if non_tensors:
                raise TypeError(f"model {name!r} state dict has non-tensor entries: {non_tensors[:5]}")
            save_file(_savable(state_dict), str(tmp / f"{name}.safetensors"), metadata={"format": "pt"})
        for name, optimizer_state in optimizers.items():
            _write_structure(tmp, f"{name}.optim", optimizer_state)
        if rng is not None:
            _write_structure(tmp, "rng", rng)
        _write_json(tmp / "meta.json", meta, indent=2)  # last: a step dir without meta.json is invalid
        _publish(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _prune(root, keep_last, keep=final)
    return str(final)


def _step_dirs(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under root, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = _STEP_DIR.match(entry.name)
        if match and entry.is_dir() and (entry / "meta.json").is_file():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def _prune(root: Path, keep_last: int, keep: Path) -> None:
    for entry in root.iterdir():  # leftovers of crashed saves (single writer, so none is in flight)
        if entry.name.startswith((_TMP_PREFIX, _OLD_PREFIX)) and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
    if keep_last <= 0:
        return
    for _, path in _step_dirs(root)[:-keep_last]:
        if path != keep:  # never delete what was just written, even when newer steps exist
            shutil.rmtree(path, ignore_errors=True)


def update_checkpoint_extra(path: str | os.PathLike, **updates: Any) -> None:
    """Change entries of a saved checkpoint's `extra` (e.g. the MLflow run a copied checkpoint logs to),
    atomically: meta.json is replaced whole."""
    meta_path = Path(path) / "meta.json"
    with open(meta_path) as f:
        meta = json.load(f)
    extra = _decode(meta["extra"], {})
    extra.update(updates)
    meta["extra"] = _encode(extra, "extra", {})
    tmp = meta_path.with_suffix(".json.tmp")
    _write_json(tmp, meta, indent=2)
    os.replace(tmp, meta_path)


def latest_checkpoint(root_dir: str | os.PathLike) -> str | None:
    """Path of the highest-step complete checkpoint, or None. Temp dirs of crashed saves are ignored."""
    dirs = _step_dirs(Path(root_dir))
    return str(dirs[-1][1]) if dirs else None


def load_checkpoint(path: str | os.PathLike, device: str = "cpu") -> Checkpoint:
    directory = Path(path)
    with open(directory / "meta.json") as f:
        meta = json.load(f)
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{directory}: checkpoint format {meta.get('format_version')}, expected {FORMAT_VERSION}")
    models = {name: load_file(str(directory / f"{name}.safetensors"), device=device) for name in meta["models"]}
    optimizers = {name: _read_structure(directory, f"{name}.optim", device) for name in meta["optimizers"]}
    # RNG states stay on the CPU: torch.set_rng_state and torch.cuda.set_rng_state take CPU byte tensors.
    rng = _read_structure(directory, "rng", "cpu") if meta["has_rng"] else None
    return Checkpoint(path=str(directory), step=meta["step"], models=models, optimizers=optimizers,
                      rng=rng, extra=_decode(meta["extra"], {}))


def capture_rng_state() -> dict:
    """torch CPU RNG, CUDA RNGs (only when CUDA is already in use), python `random`, numpy's global RNG."""
    rng = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(legacy=False),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def restore_rng(rng: dict) -> None:
    """Put back the RNG states `capture_rng_state` took (as returned by `load_checkpoint`)."""
    torch.set_rng_state(rng["torch"])
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    cuda_states = rng.get("cuda")
    if cuda_states and torch.cuda.is_available():
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        else:
            logger.warning("checkpoint has %d CUDA RNG states but %d devices are visible; CUDA RNG not restored",
                           len(cuda_states), torch.cuda.device_count())


def save_hf_model(model, tokenizer, out_dir: str | os.PathLike) -> str:
    """Save the policy as a Hugging Face folder (`from_pretrained` loads it), atomically like a checkpoint.

    Dropout that loading zeroed for RL (`pipeline.models.zero_dropout`, kept in `model.zeroed_dropout`) is
    written back with the values the model came with.
    """
    from pipeline.models import set_config_values

    out = Path(out_dir).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp_{out.name}_", dir=out.parent))
    # transformers 5 always writes safetensors and dropped the flag; 4.x still takes it.
    kwargs = {"safe_serialization": True} if "safe_serialization" in inspect.signature(model.save_pretrained).parameters else {}
    zeroed = getattr(model, "zeroed_dropout", {})
    try:
        set_config_values(model.config, zeroed)
        model.save_pretrained(str(tmp), **kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        set_config_values(model.config, {k: 0.0 for k in zeroed})
    return str(out)


def read_folder(folder: str | os.PathLike) -> dict[str, bytes]:
    """`{relative name: bytes}` of every file under `folder`: what `write_folder` writes elsewhere."""
    root = Path(folder)
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def write_folder(files: dict[str, bytes], out_dir: str | os.PathLike) -> str:
    """Write `{relative name: bytes}` as a folder, atomically: how the final model reaches the driver's
    disk when the learner runs on another node."""
    out = Path(out_dir).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp_{out.name}_", dir=out.parent))
    try:
        for name, data in files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_bytes(data)
        _publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return str(out)
