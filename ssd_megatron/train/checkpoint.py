"""Atomic, resumable checkpoints: `run_dir/checkpoints/step_XXXXXXX/`.

A checkpoint directory holds
    model.pt        full (unsharded) model state dict, FQN keys
    optimizer.pt    full optimizer state dict, FQN keys (so it loads into any data-parallel layout)
    trainer.pt      step, consumed samples (the data position), LR schedule, method state, metrics
                    counters, the resolved config (a dict), format version
    rng/rank_XXXXX.pt  python / numpy / torch CPU / CUDA generator states of each rank
    config.yaml     the resolved config, for humans
    manifest.json   written last: every file's byte size; a checkpoint without it is incomplete

Atomicity: everything is written into `checkpoints/.tmp-step_XXXXXXX/`, each file fsynced, then the
directory is renamed to `step_XXXXXXX` (an atomic rename on POSIX) and the parent fsynced. A process
killed mid-save leaves only a `.tmp-*` directory, which listing ignores and the next run deletes; the
previous `step_*` directories are untouched. Re-saving an existing step moves the old copy to
`.old-step_*` first and deletes it only after the new one is in place (a crash in between is repaired
by `clean_stale`). Only complete checkpoints are pruned to `checkpoint.keep_last`.

Every failure to read a checkpoint (missing/truncated/corrupt file, shape mismatch, another
architecture) is a one-line `UserError` naming the file.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..errors import UserError
from ..parallel.distributed import ParallelDims, all_gather_rows, barrier

FORMAT_VERSION = 1
STEP_RE = re.compile(r"^step_(\d+)$")
TMP_PREFIX = ".tmp-"
OLD_PREFIX = ".old-"


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under `root`, oldest first (temp and half-replaced dirs are ignored)."""
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = STEP_RE.match(p.name)
        if m and p.is_dir() and (p / "manifest.json").is_file():
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(root: Path) -> Optional[Path]:
    ckpts = list_checkpoints(root)
    return ckpts[-1][1] if ckpts else None


def clean_stale(root: Path) -> None:
    """Delete leftovers of interrupted saves; restore a checkpoint caught between the two renames."""
    root = Path(root)
    if not root.is_dir():
        return
    for p in root.iterdir():
        if p.name.startswith(OLD_PREFIX):
            final = root / p.name[len(OLD_PREFIX):]
            if not final.exists() and (p / "manifest.json").is_file():
                os.replace(p, final)
            else:
                shutil.rmtree(p, ignore_errors=True)
        elif p.name.startswith(TMP_PREFIX):
            shutil.rmtree(p, ignore_errors=True)


def resolve_resume(resume: str, ckpt_root: Path) -> Optional[Path]:
    """`checkpoint.resume`: auto (latest in this run, if any) | none | PATH (a step dir, or a dir of them)."""
    if resume in ("none", ""):
        return None
    if resume == "auto":
        return latest_checkpoint(ckpt_root)
    p = Path(resume)
    if not p.exists():
        raise UserError(f"checkpoint.resume: {p} does not exist; accepted: auto, none, or a checkpoint directory")
    if (p / "manifest.json").is_file():
        return p
    for candidate in (p, p / "checkpoints"):
        latest = latest_checkpoint(candidate)
        if latest is not None:
            return latest
    raise UserError(f"checkpoint.resume: {p} is not a complete checkpoint (no manifest.json) and holds none")


# --------------------------------------------------------------------------- RNG


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


# --------------------------------------------------------------------------- file helpers


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_file(obj, path: Path) -> None:
    """torch.save + flush + fsync (the unit the atomic protocol builds on; tests patch it to fail)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _write_text(text: str, path: Path) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _check_manifest(ckpt: Path) -> dict:
    mpath = ckpt / "manifest.json"
    if not mpath.is_file():
        raise UserError(f"checkpoint {ckpt} is incomplete: {mpath} is missing")
    try:
        manifest = json.loads(mpath.read_text())
        files = manifest["files"]
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"checkpoint file {mpath} is corrupt ({type(e).__name__})") from None
    for rel, size in files.items():
        f = ckpt / rel
        if not f.is_file():
            raise UserError(f"checkpoint file {f} is missing")
        actual = f.stat().st_size
        if actual != size:
            raise UserError(f"checkpoint file {f} is truncated or modified ({actual} bytes, expected {size})")
    return manifest


def read_file(path: Path, weights_only: bool = True):
    if not path.is_file():
        raise UserError(f"checkpoint file {path} is missing")
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except Exception as e:  # zip / unpickling errors of all kinds
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"checkpoint file {path} is corrupt or unreadable: {msg[:200]}") from None


# --------------------------------------------------------------------------- state dict access


def _sd_options(full: bool = True):
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(full_state_dict=full, cpu_offload=True)


def model_state(model) -> dict:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    return get_model_state_dict(model, options=_sd_options())


def optimizer_state(model, optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    osd = get_optimizer_state_dict(model, optimizer, options=_sd_options())
    # train.cuda_graph keeps lr in a device tensor (step_graph.py); files hold floats, so they load anywhere.
    if "param_groups" in osd:
        osd["param_groups"] = [{**g, "lr": float(g["lr"])} if torch.is_tensor(g.get("lr")) else g
                               for g in osd["param_groups"]]
    return osd


def _check_model_compat(sd: dict, model, path: Path) -> None:
    own = model.state_dict()
    # A SwitchableFFN's `expert_major` buffer is newer than the format: absent means neuron order.
    missing = [k for k in own if k not in sd and not k.endswith(".expert_major")]
    unexpected = [k for k in sd if k not in own]
    if missing or unexpected:
        what = f"lacks {missing[0]}" if missing else f"has unexpected {unexpected[0]}"
        extra = len(missing) + len(unexpected) - 1
        raise UserError(f"checkpoint file {path} does not match this model: it {what}"
                        f"{f' (+{extra} more)' if extra else ''} (different model config?)")
    for k, v in sd.items():
        mine = own[k]
        shape = tuple(mine.full_tensor().shape) if hasattr(mine, "full_tensor") else tuple(mine.shape)
        if tuple(v.shape) != shape:
            raise UserError(f"checkpoint file {path} does not match this model: {k} has shape {tuple(v.shape)} "
                            f"in the checkpoint, {shape} in the model (different model config?)")


# --------------------------------------------------------------------------- manager


class CheckpointManager:
    def __init__(self, run_dir: Path, ccfg, dims: ParallelDims):
        self.root = Path(run_dir) / "checkpoints"
        self.ccfg = ccfg
        self.dims = dims
        if dims.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            clean_stale(self.root)
        barrier(dims)

    # ---- save

    def save(self, step: int, model, optimizer, trainer_state: dict, config_yaml: str) -> Path:
        """Collective: every rank calls it. Returns the final directory."""
        dims = self.dims
        name = step_dir_name(step)
        tmp = self.root / (TMP_PREFIX + name)
        final = self.root / name
        if dims.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        barrier(dims)
        # Gathering full state dicts is collective under FSDP2: every rank takes part.
        msd = model_state(model)
        osd = optimizer_state(model, optimizer)
        error: Optional[BaseException] = None
        try:
            write_file(rng_state(), tmp / "rng" / f"rank_{dims.rank:05d}.pt")
            if dims.is_main:
                write_file(msd, tmp / "model.pt")
                write_file(osd, tmp / "optimizer.pt")
                state = dict(trainer_state, format_version=FORMAT_VERSION, step=step, world_size=dims.world_size)
                write_file(state, tmp / "trainer.pt")
                _write_text(config_yaml, tmp / "config.yaml")
        except BaseException as e:  # noqa: BLE001 - re-raised below, after the ranks agree
            error = e
        failed = all_gather_rows(torch.tensor([0 if error is None else 1], device=dims.comm_device), dims)
        if int(failed.sum()) > 0:
            if dims.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            if error is not None:
                raise error
            raise RuntimeError(f"checkpoint save at step {step} failed on another rank")
        if dims.is_main:
            files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
            _write_text(json.dumps({"format_version": FORMAT_VERSION, "step": step, "files": files}, indent=1),
                        tmp / "manifest.json")
            _fsync_dir(tmp / "rng")
            _fsync_dir(tmp)
            old = None
            if final.exists():
                old = self.root / (OLD_PREFIX + name)
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
            os.replace(tmp, final)
            _fsync_dir(self.root)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
            self._prune()
        barrier(dims)
        return final

    def _prune(self) -> None:
        ckpts = list_checkpoints(self.root)
        for _, p in ckpts[: max(0, len(ckpts) - self.ccfg.keep_last)]:
            shutil.rmtree(p, ignore_errors=True)

    # ---- load

    def load(self, ckpt: Path, model, optimizer, arch: str) -> dict:
        """Restore model, optimizer and this rank's RNG from `ckpt`; returns the trainer state."""
        return load_checkpoint(ckpt, model, optimizer, arch, self.dims)


def load_trainer_state(ckpt: Path) -> dict:
    ckpt = Path(ckpt)
    _check_manifest(ckpt)
    tpath = ckpt / "trainer.pt"
    state = read_file(tpath, weights_only=False)
    if not isinstance(state, dict) or "step" not in state or "config" not in state:
        raise UserError(f"checkpoint file {tpath} is not an ssd-megatron trainer state")
    if state.get("format_version", 0) > FORMAT_VERSION:
        raise UserError(f"checkpoint file {tpath} has format version {state['format_version']}; "
                        f"this build reads up to {FORMAT_VERSION}")
    return state


def load_model_weights(ckpt: Path, model, arch: Optional[str] = None) -> dict:
    """Check compatibility and load model.pt into `model`; returns the trainer state."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    ckpt = Path(ckpt)
    state = load_trainer_state(ckpt)
    ck_arch = state["config"].get("model", {}).get("arch")
    if arch is not None and ck_arch != arch:
        raise UserError(f"checkpoint file {ckpt / 'trainer.pt'} is for model.arch={ck_arch!r}, "
                        f"this run has model.arch={arch!r}")
    mpath = ckpt / "model.pt"
    sd = read_file(mpath)
    _check_model_compat(sd, model, mpath)
    try:
        set_model_state_dict(model, sd, options=StateDictOptions(full_state_dict=True, strict=True))
    except (RuntimeError, KeyError, ValueError) as e:
        raise UserError(f"checkpoint file {mpath} does not load into this model: {str(e).splitlines()[0][:200]}") \
            from None
    return state


def load_checkpoint(ckpt: Path, model, optimizer, arch: str, dims: ParallelDims) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    ckpt = Path(ckpt)
    state = load_model_weights(ckpt, model, arch)
    if optimizer is not None:
        opath = ckpt / "optimizer.pt"
        osd = read_file(opath)
        try:
            set_optimizer_state_dict(model, optimizer, osd, options=StateDictOptions(full_state_dict=True))
        except (RuntimeError, KeyError, ValueError, IndexError) as e:
            raise UserError(f"checkpoint file {opath} does not match this optimizer: "
                            f"{str(e).splitlines()[0][:200]}") from None
    rpath = ckpt / "rng" / f"rank_{dims.rank:05d}.pt"
    if not rpath.is_file():  # resumed on more ranks than saved: new ranks reuse rank 0's stream
        rpath = ckpt / "rng" / "rank_00000.pt"
    set_rng_state(read_file(rpath, weights_only=False))
    return state
