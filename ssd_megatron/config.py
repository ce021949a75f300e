"""Experiment configuration: YAML files → typed, validated dataclasses.

A config file may extend others with `defaults: other.yaml` (or a list; paths relative to the file),
and any key can be overridden on the command line with dotted `section.key=value` pairs. Every user
mistake (unknown key, wrong type, out-of-range value, missing file) raises `UserError` with one line
naming the key and what is accepted, with a "did you mean" for typos.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from .errors import UserError

METHODS = ("dense", "ssd", "smoe", "moe_dropout", "pld")
ARCHS = ("gpt", "bert", "t5", "llama")


def _meta(lo=None, hi=None, lo_open=False, hi_open=False, help=""):
    return {"lo": lo, "hi": hi, "lo_open": lo_open, "hi_open": hi_open, "help": help}


@dataclass
class ModelConfig:
    arch: Literal["gpt", "bert", "t5", "llama"] = "gpt"
    n_layers: int = field(default=2, metadata=_meta(lo=1))
    # T5 only: decoder depth (0 = same as n_layers).
    n_decoder_layers: int = field(default=0, metadata=_meta(lo=0))
    d_model: int = field(default=128, metadata=_meta(lo=1))
    n_heads: int = field(default=4, metadata=_meta(lo=1))
    # 0 = same as n_heads (grouped-query attention otherwise; llama-style models).
    n_kv_heads: int = field(default=0, metadata=_meta(lo=0))
    d_ff: int = field(default=1024, metadata=_meta(lo=1))
    # gelu_tanh = the tanh approximation (HF gpt2's gelu_new); needed to load HF GPT-2 checkpoints exactly.
    activation: Literal["relu", "gelu", "gelu_tanh", "squared_relu", "swiglu", "geglu", "reglu"] = "relu"
    max_seq_len: int = field(default=128, metadata=_meta(lo=1))
    # 0 = take the tokenizer's vocabulary size (padded to a multiple of `vocab_multiple`).
    vocab_size: int = field(default=0, metadata=_meta(lo=0))
    vocab_multiple: int = field(default=64, metadata=_meta(lo=1))
    dropout: float = field(default=0.0, metadata=_meta(lo=0.0, hi=1.0, hi_open=True))
    bias: bool = True
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_eps: float = field(default=1e-5, metadata=_meta(lo=0.0, lo_open=True))
    # pre = norm before attention/FFN (paper appendix A, GPT-2, T5, llama); post = original BERT
    # (norm after each residual add; needed to load HF BERT checkpoints).
    norm_position: Literal["pre", "post"] = "pre"
    # llama arch: normalise q and k per head (Persimmon-style qk-layernorm; uses `norm`).
    qk_norm: bool = False
    tie_embeddings: bool = True
    init_std: float = field(default=0.02, metadata=_meta(lo=0.0, lo_open=True))
    # T5 relative position buckets.
    relative_attention_num_buckets: int = field(default=32, metadata=_meta(lo=1))
    relative_attention_max_distance: int = field(default=128, metadata=_meta(lo=1))
    rope_theta: float = field(default=10000.0, metadata=_meta(lo=0.0, lo_open=True))
    # Megatron-LM's switch, same default: under bf16/fp16 autocast the residual stream (embedding output
    # and every residual add) is kept in the autocast dtype, as in Megatron (bf16 params) and torchtitan
    # (FSDP param_dtype bf16). True keeps it in fp32 (more memory traffic: ~1.5 ms of a GPT-base step on
    # an H100, docs/performance.md). No effect in fp32 training (CPU).
    fp32_residual_connection: bool = False


@dataclass
class DataConfig:
    # Prefix of preprocessed data: PREFIX_train.{bin,idx} and PREFIX_valid.{bin,idx}. Empty = the
    # embedded default corpus (Python standard library sources), built and cached on first use.
    path: str = ""
    # sentencepiece model; empty = the default corpus' tokenizer.
    tokenizer: str = ""
    seq_len: int = field(default=128, metadata=_meta(lo=2))
    # T5: decoder length is derived from seq_len, noise density and mean span length.
    mask_rate: float = field(default=0.15, metadata=_meta(lo=0.0, hi=1.0, lo_open=True, hi_open=True))
    mean_span_length: float = field(default=3.0, metadata=_meta(lo=1.0))
    seed: int = 1234


@dataclass
class TrainConfig:
    max_steps: int = field(default=300, metadata=_meta(lo=1))
    global_batch_size: int = field(default=16, metadata=_meta(lo=1))
    micro_batch_size: int = field(default=16, metadata=_meta(lo=1))
    # Default: runs/<config name>.
    output_dir: str = ""
    seed: int = 1234
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # auto = bf16 autocast on CUDA, fp32 on CPU.
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    compile: bool = False
    # Capture the whole step (fwd/bwd of every micro-batch, clip, AdamW) as one CUDA graph per kind of step
    # (dense; SSD's two phases) after 3 eager steps of that kind (train/step_graph.py). Serves CUDA, one
    # process, methods dense and ssd: true = required (error elsewhere), auto = where it can (eager
    # elsewhere, with a note), false = never. blocks = CUDA graphs per transformer block instead (torch.compile
    # reduce-overhead, implies train.compile; one process or DDP, methods dense and ssd: train/block_graphs.py),
    # which auto takes for SSD runs of several DDP processes.
    cuda_graph: Literal[False, True, "auto", "blocks"] = False
    grad_clip: float = field(default=1.0, metadata=_meta(lo=0.0))
    eval_interval: int = field(default=100, metadata=_meta(lo=1))
    eval_batches: int = field(default=8, metadata=_meta(lo=1))
    log_interval: int = field(default=1, metadata=_meta(lo=1))
    # Python's garbage collector runs only every this many steps (train/host_gc.py; Megatron's
    # --manual-gc, torchtitan's gc_freq); 0 = Python's automatic collection.
    gc_interval: int = field(default=50, metadata=_meta(lo=0))


@dataclass
class OptimConfig:
    lr: float = field(default=1e-3, metadata=_meta(lo=0.0, lo_open=True))
    min_lr: float = field(default=0.0, metadata=_meta(lo=0.0))
    weight_decay: float = field(default=0.01, metadata=_meta(lo=0.0))
    beta1: float = field(default=0.9, metadata=_meta(lo=0.0, hi=1.0, hi_open=True))
    beta2: float = field(default=0.98, metadata=_meta(lo=0.0, hi=1.0, hi_open=True))
    eps: float = field(default=1e-8, metadata=_meta(lo=0.0, lo_open=True))
    # noam: lr * d_model^-0.5 * min(step^-0.5, step * warmup^-1.5) (paper, appendix A);
    # cosine: linear warm-up then cosine to min_lr; constant: warm-up then flat.
    schedule: Literal["noam", "cosine", "constant"] = "cosine"
    warmup_steps: int = field(default=50, metadata=_meta(lo=0))
    # The AdamW update on CUDA: auto/triton = one Triton launch per group (train/triton_adamw.py),
    # torch = torch's fused AdamW. CPU always runs torch's foreach AdamW.
    kernel: Literal["auto", "triton", "torch"] = "auto"


@dataclass
class SSDConfig:
    num_experts: int = field(default=32, metadata=_meta(lo=1))
    top_k: int = field(default=6, metadata=_meta(lo=1))
    threshold: float = field(default=0.9, metadata=_meta(lo=0.0, hi=1.0))
    monitor_interval: int = field(default=3000, metadata=_meta(lo=1))
    sparse_ratio: float = field(default=0.5, metadata=_meta(lo=0.0, hi=1.0, lo_open=True, hi_open=True))
    final_dense_ratio: float = field(default=0.1, metadata=_meta(lo=0.0, hi=1.0, hi_open=True))
    switch_policy: Literal["threshold", "random"] = "threshold"
    backend: Literal["auto", "reference", "grouped_mm", "triton", "megablocks"] = "auto"
    cluster_backend: Literal["torch", "faiss"] = "torch"
    # Let the router's scores (x · c_n) send gradient into W_i through the centroids (paper: yes).
    router_grad: bool = True
    # |h| below this counts as inactive for non-ReLU activations when measuring sparsity.
    sparsity_threshold: float = field(default=1e-3, metadata=_meta(lo=0.0))
    # Tokens of the fixed validation batch on which activation sparsity is measured.
    sparsity_batches: int = field(default=1, metadata=_meta(lo=1))


@dataclass
class SMoEConfig:
    num_experts: int = field(default=3, metadata=_meta(lo=1))
    top_k: int = field(default=2, metadata=_meta(lo=1))
    aux_loss_coef: float = field(default=0.01, metadata=_meta(lo=0.0))
    z_loss_coef: float = field(default=0.0, metadata=_meta(lo=0.0))
    # Every expert on, softmax-gated over all N: the paper's densely fine-tuned SMoE (D).
    all_experts: bool = False


@dataclass
class MoEDropoutConfig:
    num_experts: int = field(default=32, metadata=_meta(lo=1))
    k_start: int = field(default=6, metadata=_meta(lo=1))
    # 0 = num_experts (the final model is dense).
    k_end: int = field(default=0, metadata=_meta(lo=0))
    # Steps over which K ramps from k_start to k_end (0 = train.max_steps).
    ramp_steps: int = field(default=0, metadata=_meta(lo=0))
    # K used for evaluation / the final model (0 = num_experts: dense).
    eval_k: int = field(default=0, metadata=_meta(lo=0))


@dataclass
class PLDConfig:
    theta_bar: float = field(default=0.5, metadata=_meta(lo=0.0, hi=1.0))
    gamma: float = field(default=0.001, metadata=_meta(lo=0.0))


@dataclass
class ParallelConfig:
    # Megatron vocabulary. The data-parallel size is world_size / (tp * ep * pp).
    tensor_model_parallel_size: int = field(default=1, metadata=_meta(lo=1))
    expert_model_parallel_size: int = field(default=1, metadata=_meta(lo=1))
    pipeline_model_parallel_size: int = field(default=1, metadata=_meta(lo=1, hi=1))
    sequence_parallel: bool = False
    # ddp = replicated parameters; fsdp = FSDP2 fully_shard per block.
    data_parallel: Literal["ddp", "fsdp"] = "ddp"
    # auto = nccl on CUDA, gloo on CPU.
    backend: Literal["auto", "nccl", "gloo"] = "auto"


@dataclass
class CheckpointConfig:
    interval: int = field(default=100, metadata=_meta(lo=1))
    keep_last: int = field(default=2, metadata=_meta(lo=1))
    # auto = resume from the latest checkpoint in the run directory if there is one; none = start
    # fresh; or a path to a checkpoint directory.
    resume: str = "auto"


@dataclass
class LoggingConfig:
    tensorboard: bool = True
    wandb: Literal["offline", "online", "disabled"] = "disabled"
    wandb_project: str = "ssd-megatron"
    progress: bool = True
    report: bool = True


@dataclass
class ExperimentConfig:
    name: str = ""
    method: Literal["dense", "ssd", "smoe", "moe_dropout", "pld"] = "dense"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ssd: SSDConfig = field(default_factory=SSDConfig)
    smoe: SMoEConfig = field(default_factory=SMoEConfig)
    moe_dropout: MoEDropoutConfig = field(default_factory=MoEDropoutConfig)
    pld: PLDConfig = field(default_factory=PLDConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    @property
    def output_dir(self) -> Path:
        return Path(self.train.output_dir or os.path.join("runs", self.name or "default"))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- loading and merging


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise UserError(f"{path}{where}: not valid YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: a config file must be a YAML mapping of sections, got {type(data).__name__}")
    return data


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _load_with_defaults(path: Path, seen: tuple = ()) -> dict:
    path = path.resolve()
    if path in seen:
        raise UserError(f"{path}: 'defaults' forms a cycle: {' -> '.join(str(p) for p in seen + (path,))}")
    data = _read_yaml(path)
    parents = data.pop("defaults", None) or []
    if isinstance(parents, str):
        parents = [parents]
    if not isinstance(parents, list) or not all(isinstance(p, str) for p in parents):
        raise UserError(f"{path}: 'defaults' must be a file name or a list of file names")
    merged: dict = {}
    for parent in parents:
        ppath = (path.parent / parent) if not os.path.isabs(parent) else Path(parent)
        if not ppath.is_file() and ppath.suffix == "":
            ppath = ppath.with_suffix(".yaml")
        if not ppath.is_file():
            raise UserError(f"{path}: defaults file not found: {ppath}")
        merged = _deep_merge(merged, _load_with_defaults(ppath, seen + (path,)))
    return _deep_merge(merged, data)


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise UserError(f"override {item!r}: expected section.key=value (e.g. train.max_steps=50)")
    key, raw = item.split("=", 1)
    key = key.strip().lstrip("-")
    if not key:
        raise UserError(f"override {item!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    data = dict(data)
    for item in overrides:
        parts, value = _parse_override(item)
        node = data
        for p in parts[:-1]:
            child = node.get(p)
            if not isinstance(child, dict):
                child = {}
            node[p] = child = dict(child)
            node = child
        node[parts[-1]] = value
    return data


# --------------------------------------------------------------------------- typed conversion


def _suggest(name: str, options) -> str:
    close = difflib.get_close_matches(name, list(options), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if tp is float:
        return "a number"
    if tp is int:
        return "an integer"
    if tp is bool:
        return "true or false"
    if tp is str:
        return "a string"
    return str(tp)


def _coerce(key: str, value: Any, tp) -> Any:
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(key, value, args[0])
    if origin is Literal:
        choices = typing.get_args(tp)
        if not any(type(value) is type(c) and value == c for c in choices):  # 1 is not true
            names = [str(c).lower() if isinstance(c, bool) else str(c) for c in choices]
            hint = _suggest(str(value), names)
            raise UserError(f"{key}: {value!r} is not accepted{hint}; accepted: {', '.join(names)}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise UserError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # PyYAML (YAML 1.1) reads 3e-4 (no dot) as a string; accept what float() accepts.
            try:
                return float(value.strip())
            except ValueError:
                raise UserError(f"{key}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if value is None:
            return ""
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise UserError(f"{key}: expected a string, got {value!r}")
        return str(value)
    raise TypeError(f"unsupported config type {tp} for {key}")


def _check_range(key: str, value, meta: dict) -> None:
    lo, hi = meta.get("lo"), meta.get("hi")
    if lo is None and hi is None:
        return
    bad_lo = lo is not None and (value <= lo if meta.get("lo_open") else value < lo)
    bad_hi = hi is not None and (value >= hi if meta.get("hi_open") else value > hi)
    if bad_lo or bad_hi:
        left = "(" if meta.get("lo_open") else "["
        right = ")" if meta.get("hi_open") else "]"
        lo_s = "-inf" if lo is None else lo
        hi_s = "inf" if hi is None else hi
        raise UserError(f"{key}: {value!r} is out of range; accepted: {left}{lo_s}, {hi_s}{right}")


def _build(cls, data: dict, prefix: str):
    if not isinstance(data, dict):
        raise UserError(f"{prefix.rstrip('.') or 'config'}: expected a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        full = prefix + str(key)
        if key not in fields:
            raise UserError(f"{full}: unknown key{_suggest(str(key), fields)}; accepted: {', '.join(fields)}")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value if value is not None else {}, full + ".")
            continue
        v = _coerce(full, value, tp)
        _check_range(full, v, fields[key].metadata)
        kwargs[key] = v
    return cls(**kwargs)


def _validate(cfg: ExperimentConfig) -> None:
    m = cfg.model
    if m.d_model % m.n_heads:
        raise UserError(f"model.d_model: {m.d_model} must be divisible by model.n_heads ({m.n_heads})")
    if m.n_kv_heads and m.n_heads % m.n_kv_heads:
        raise UserError(f"model.n_kv_heads: {m.n_kv_heads} must divide model.n_heads ({m.n_heads})")
    if cfg.data.seq_len > m.max_seq_len and m.arch != "t5":
        raise UserError(f"data.seq_len: {cfg.data.seq_len} exceeds model.max_seq_len ({m.max_seq_len})")
    t = cfg.train
    if t.global_batch_size % t.micro_batch_size:
        raise UserError(
            f"train.global_batch_size: {t.global_batch_size} must be a multiple of "
            f"train.micro_batch_size ({t.micro_batch_size})")
    if cfg.method == "ssd":
        s = cfg.ssd
        if m.d_ff % s.num_experts:
            raise UserError(f"ssd.num_experts: {s.num_experts} must divide model.d_ff ({m.d_ff})")
        if s.top_k > s.num_experts:
            raise UserError(f"ssd.top_k: {s.top_k} must be <= ssd.num_experts ({s.num_experts})")
        if s.sparse_ratio + s.final_dense_ratio >= 1:
            raise UserError(
                f"ssd.sparse_ratio: {s.sparse_ratio} + ssd.final_dense_ratio ({s.final_dense_ratio}) must be < 1")
    if cfg.method == "smoe":
        s = cfg.smoe
        if m.d_ff % s.num_experts:
            raise UserError(f"smoe.num_experts: {s.num_experts} must divide model.d_ff ({m.d_ff})")
        if s.top_k > s.num_experts:
            raise UserError(f"smoe.top_k: {s.top_k} must be <= smoe.num_experts ({s.num_experts})")
    if cfg.method == "moe_dropout":
        s = cfg.moe_dropout
        if m.d_ff % s.num_experts:
            raise UserError(f"moe_dropout.num_experts: {s.num_experts} must divide model.d_ff ({m.d_ff})")
        k_end = s.k_end or s.num_experts
        if not s.k_start <= k_end <= s.num_experts:
            raise UserError(
                f"moe_dropout.k_start: need k_start ({s.k_start}) <= k_end ({k_end}) <= num_experts ({s.num_experts})")
        if s.eval_k > s.num_experts:
            raise UserError(f"moe_dropout.eval_k: {s.eval_k} must be <= moe_dropout.num_experts ({s.num_experts}); "
                            "0 = dense")


def config_from_dict(data: dict, name: str = "") -> ExperimentConfig:
    data = dict(data)
    if not data.get("name"):
        data["name"] = name
    cfg = _build(ExperimentConfig, data, "")
    _validate(cfg)
    return cfg


def load_config(path: Optional[str | os.PathLike] = None, overrides: Optional[list[str]] = None) -> ExperimentConfig:
    """Load `path` (None = the built-in default job, configs/gpt_tiny.yaml), apply overrides, validate."""
    if path is None:
        path = default_config_path()
    path = Path(path)
    data = _load_with_defaults(path)
    data = apply_overrides(data, overrides or [])
    return config_from_dict(data, name=path.stem)


def default_config_path() -> Path:
    """configs/gpt_tiny.yaml from a source checkout, else the copy shipped inside the package."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "configs" / "gpt_tiny.yaml", here / "configs" / "gpt_tiny.yaml"):
        if candidate.is_file():
            return candidate
    raise UserError("no config given and configs/gpt_tiny.yaml not found; pass a config file")


def dump_config(cfg: ExperimentConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)


def save_config(cfg: ExperimentConfig, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(dump_config(cfg))
    os.replace(tmp, path)
