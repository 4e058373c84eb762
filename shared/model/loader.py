"""Load a Hugging Face DeepSeek-V3 directory into `DeepseekV3`.

The model is built on the meta device, then every parameter is filled straight from the mapped
safetensors files, one tensor at a time: peak memory stays near the weights' size. FP8 block-scaled
weights are dequantized to the compute dtype as they are read. The first MTP layer
(`model.layers.{num_hidden_layers}...`) is loaded as `model.mtp`, with its embedding and head sharing
the main model's memory where they are equal; further MTP layers are skipped. Only safetensors: never
torch.load or pickle.
"""
from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from shared.cache.hashing import model_fingerprint
from shared.launcher.cliargs import home
from shared.model.config import ModelArgs
from shared.model.experts import ExpertStack, MoEPlan, default_plan
from shared.model.fp8 import dequantize_blockwise
from shared.model.model import DeepseekV3
from shared.model.moe import MoE
from shared.model.safetensors_io import SafetensorsFile

DTYPE_NAMES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
               "fp16": torch.float16, "float16": torch.float16}
FP32_TENSORS = re.compile(r"\.mlp\.gate\.(weight|e_score_correction_bias)$")  # routing stays fp32
LAYER_INDEX = re.compile(r"^model\.layers\.(\d+)\.")


class CheckpointError(ValueError):
    """A checkpoint whose tensors do not fit the model its config.json describes."""


def resolve_dtype(dtype: str | torch.dtype | None, args: ModelArgs) -> torch.dtype:
    """The compute dtype. None or "auto": the checkpoint's. (A deployment's `--dtype auto` is
    chosen by measurement before anything loads, shared/runtime/numerics.py; no guess from CPU flags here.)"""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = args.dtype if dtype in (None, "auto") else dtype
    if name not in DTYPE_NAMES:
        raise ValueError(f"dtype={name!r} is not supported: use one of auto, bf16, fp32, fp16")
    return DTYPE_NAMES[name]


def load_model(path: str | Path, dtype: str | torch.dtype | None = None,
               device: str | torch.device = "cpu", keep: Callable[[str], bool] | None = None,
               moe_backend: str | MoEPlan | None = None) -> DeepseekV3:
    """A ready, eval-mode model from a Hugging Face directory (config.json + safetensors).
    `keep(name)` False leaves a tensor unread on the meta device (an EP rank reads only its
    experts, then cuts the others away). `moe_backend`: a backend or plan (experts.py; `auto` is
    resolved by calibration before, shared/runtime/numerics.py); None: experts.default_plan."""
    path = Path(path)
    args = ModelArgs.from_file(path / "config.json")
    device = torch.device(device)
    compute_dtype = resolve_dtype(dtype, args)
    with torch.device("meta"):
        model = DeepseekV3(args)
    files = _open_files(path)
    expected = dict(model.named_parameters())
    expected.update(model.named_buffers())
    located = _locate(files, expected, args)
    _stack_experts(model, keep, compute_dtype, device)

    for name, meta in expected.items():
        if keep is not None and not keep(name):
            continue
        if name not in located:
            if name == "lm_head.weight" and args.tie_word_embeddings:
                continue
            raise CheckpointError(f"{path}: tensor {name!r} is missing from the checkpoint "
                                  f"(looked in {', '.join(sorted(f.path.name for f in files.values()))})")
        file = located[name]
        if file.shape(name) != tuple(meta.shape):
            raise CheckpointError(f"{file.path}: tensor {name!r} has shape {list(file.shape(name))}, "
                                  f"the config expects {list(meta.shape)}")
        target = torch.float32 if FP32_TENSORS.search(name) else compute_dtype
        if _assign(model, name, _read(file, name, located, args, target, device)):
            file.release(name)  # copied into its expert stack: the file's pages are not needed twice
    if args.tie_word_embeddings and "lm_head.weight" not in located:
        model.lm_head.weight = model.model.embed_tokens.weight
    _share_mtp_copies(model)
    model.set_moe_backend(moe_backend if moe_backend is not None else default_plan(device, compute_dtype))
    return model.eval()


def read_tensors(path: str | Path, names: list[str], dtype: torch.dtype,
                 device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Some tensors of a checkpoint, converted as load_model converts them (FP8 dequantized):
    what an EP rank reads when a new placement gives it experts it did not hold."""
    path = Path(path)
    args = ModelArgs.from_file(path / "config.json")
    files = _open_files(path)
    located = {name: f for f in files.values() for name in f.names}
    out = {}
    for name in names:
        if name not in located:
            raise CheckpointError(f"{path}: tensor {name!r} is missing from the checkpoint")
        out[name] = _read(located[name], name, located, args, dtype, torch.device(device)).clone()
    return out


def checkpoint_fingerprint(path: str | Path, dtype: torch.dtype) -> str:
    """The model fingerprint that seeds block hashes: the weight files' checksums (remembered
    under $STREAMOE_HOME/checksums) plus the compute dtype, which changes the KV values."""
    path = Path(path)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no safetensors files to fingerprint")
    return model_fingerprint(files, str(dtype).removeprefix("torch."), cache_dir=home() / "checksums")


def _open_files(path: Path) -> dict[str, SafetensorsFile]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e!r})") from None
        names = sorted(set(weight_map.values()))
    elif (path / "model.safetensors").exists():
        names = ["model.safetensors"]
    else:
        if list(path.glob("*.bin")) or list(path.glob("*.pt")):
            raise CheckpointError(f"{path}: only pickle checkpoints (.bin/.pt) found; streamoe loads safetensors only")
        raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")
    files = {}
    for name in names:
        if not (path / name).exists():
            raise CheckpointError(f"{index}: names shard {name!r}, which does not exist")
        files[name] = SafetensorsFile(path / name)
    return files


def _locate(files: dict[str, SafetensorsFile], expected: dict[str, torch.Tensor],
            args: ModelArgs) -> dict[str, SafetensorsFile]:
    """name -> the file holding it; rejects tensors the model has no place for."""
    located: dict[str, SafetensorsFile] = {}
    for file in files.values():
        for name in file.names:
            if name in located:
                raise CheckpointError(f"{file.path}: tensor {name!r} is also in {located[name].path.name}")
            layer = LAYER_INDEX.match(name)
            if layer and int(layer.group(1)) >= args.num_kv_layers:
                continue  # MTP layers past the first: drafts reuse the first
            if name.endswith("_scale_inv"):
                if name.removesuffix("_scale_inv") not in expected:
                    raise CheckpointError(f"{file.path}: unexpected tensor {name!r} (no weight of that name)")
            elif name not in expected:
                raise CheckpointError(f"{file.path}: unexpected tensor {name!r}; the config builds no such parameter")
            located[name] = file
    return located


def _read(file: SafetensorsFile, name: str, located: dict[str, SafetensorsFile], args: ModelArgs,
          target: torch.dtype, device: torch.device) -> torch.Tensor:
    raw = file.get(name)
    if raw.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
        scale_file = located.get(name + "_scale_inv")
        if scale_file is None:
            raise CheckpointError(f"{file.path}: FP8 tensor {name!r} has no {name + '_scale_inv'!r}")
        if args.fp8_block_size is None:
            raise CheckpointError(f"{file.path}: tensor {name!r} is FP8 but config.json has no quantization_config")
        try:
            tensor = dequantize_blockwise(raw, scale_file.get(name + "_scale_inv"), args.fp8_block_size, target)
        except ValueError as e:
            raise CheckpointError(f"{file.path}: tensor {name!r}: {e}") from None
        file.release(name)
        return tensor.to(device)
    if raw.dtype == target and device.type == "cpu":
        return raw  # zero-copy view of the mapped file
    tensor = raw.to(device=device, dtype=target, copy=True)
    file.release(name)
    return tensor


def _stack_experts(model: DeepseekV3, keep: Callable[[str], bool] | None, dtype: torch.dtype,
                   device: torch.device) -> None:
    """Each MoE layer whose experts are all read gets its stack (w13, w2) allocated now; the
    experts' tensors are then copied into its views as they are read. (An EP rank keeps a few
    experts per layer and stacks its own slots, shared/ep/moe.py.)"""
    args = model.args
    for i, block in enumerate(model.model.layers):
        if not isinstance(block.mlp, MoE):
            continue
        prefix = f"model.layers.{i}.mlp.experts."
        if keep is not None and not all(keep(f"{prefix}{e}.{p}.weight") for e in range(args.n_routed_experts)
                                        for p in ("gate_proj", "up_proj", "down_proj")):
            continue
        block.mlp.use_stack(ExpertStack.empty(args.n_routed_experts, args.hidden_size, args.moe_intermediate_size,
                                              dtype, device))


def _share_mtp_copies(model: DeepseekV3) -> None:
    """The MTP layer's embedding and output head are copies of the main model's in DeepSeek's
    checkpoints: where equal, one tensor serves both."""
    mtp = model.mtp
    if mtp is None:
        return
    pairs = ((mtp.embed_tokens, model.model.embed_tokens), (mtp.shared_head.head, model.lm_head))
    for copy, main in pairs:
        if (not copy.weight.is_meta and not main.weight.is_meta and copy.weight.shape == main.weight.shape
                and torch.equal(copy.weight, main.weight)):
            copy.weight = main.weight


def _assign(model: nn.Module, name: str, tensor: torch.Tensor) -> bool:
    """Put a tensor read from the checkpoint in its place; True when it was copied into memory the
    model already holds (a view of an expert stack)."""
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    current = module._parameters.get(leaf)
    if current is not None and not current.is_meta:
        with torch.no_grad():
            current.copy_(tensor)
        return True
    if leaf in module._parameters:
        module._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
    else:
        module._buffers[leaf] = tensor
    return False
