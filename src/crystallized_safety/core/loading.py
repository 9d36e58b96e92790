"""Opening models: a `.gguf` file (dequantised once and cached), a local directory or a hub id, on one device or
sharded over several (`device_map`, with CPU and disk offload); saving model directories that transformers 4
and 5 both read; where the tool caches what it builds."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from ..errors import ModelError, first_line
from .mixed_precision import mix_precision
from .model import Model

CACHE_ENV = "CSAFETY_CACHE"
_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def cache_dir() -> Path:
    """Where dequantised GGUF copies and built organisms live (env `CSAFETY_CACHE` overrides)."""
    root = os.environ.get(CACHE_ENV) or os.path.join(Path.home(), ".cache", "crystallized-safety")
    return Path(root)


def _fingerprint_dir(path: Path) -> str:
    """Content hash of a model directory: full sha256 of small weight files, a fingerprint of big ones."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in {".safetensors", ".bin", ".json", ".gguf"})
    for file in files:
        digest.update(file.name.encode())
        digest.update(file_sha256(file, head_tail_only=file.stat().st_size > 2**31).encode())
    return "sha256:" + digest.hexdigest()


def file_sha256(path: Path, head_tail_only: bool = False) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        if head_tail_only:  # multi-GB shards: size + first and last 16 MiB
            size = path.stat().st_size
            digest.update(str(size).encode())
            digest.update(fh.read(2**24))
            fh.seek(max(0, size - 2**24))
            digest.update(fh.read())
        else:
            for chunk in iter(lambda: fh.read(2**22), b""):
                digest.update(chunk)
    return digest.hexdigest()


def resolve_device_dtype(device: str = "auto", dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    """auto: cuda + bf16 when a GPU is present, else cpu + fp32."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ModelError(f"unknown device '{device}': use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelError("device 'cuda' requested but no GPU is visible; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ModelError(f"device '{device}' requested but this machine has {torch.cuda.device_count()} GPU(s)")
    if dtype == "auto":
        return dev, (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    if dtype == MIXED:
        return dev, torch.float32  # loaded in fp32, then its matmuls switched to bf16 (core.mixed_precision)
    if dtype not in _DTYPES:
        raise ModelError(f"unknown dtype '{dtype}': use auto, float32, bfloat16, float16 or mixed")
    return dev, _DTYPES[dtype]


DeviceMap = str | dict[str, Any] | None
DEVICE_MAP_PRESETS = ("auto", "balanced", "balanced_low_0", "sequential")  # accelerate's named placements


def check_device_map(device_map: DeviceMap) -> DeviceMap:
    """A device map transformers/accelerate can place: "auto" | "balanced" | "sequential" | {module: device}, the
    devices existing here ("cpu", "disk", "cuda:N" / N with N < the GPU count); one clear error otherwise."""
    if device_map is None or device_map in DEVICE_MAP_PRESETS:
        return device_map
    if not isinstance(device_map, dict) or not device_map:
        raise ModelError(f"unknown device map {device_map!r}: use auto, balanced, sequential or {{module: device}}")
    gpus = torch.cuda.device_count()
    for module, place in device_map.items():
        index = place if isinstance(place, int) else None
        if isinstance(place, str) and place.startswith("cuda"):
            index = int(place.partition(":")[2] or 0) if place.partition(":")[2].isdigit() or place == "cuda" else -1
        if index is not None and not 0 <= index < gpus:
            raise ModelError(f"device map puts '{module}' on {place!r} but this machine has {gpus} GPU(s)")
        if index is None and place not in ("cpu", "disk", "meta"):
            raise ModelError(f"device map puts '{module}' on {place!r}: use cpu, disk, cuda:N or a GPU index")
    if all(place in ("disk", "meta") for place in device_map.values()):  # weights only stored, never computed
        raise ModelError(
            f"device map {json.dumps(device_map)[:80]} puts no module on cpu or a GPU: nothing could compute; "
            "place at least one module on cpu or cuda:N"
        )
    return device_map


def check_map_modules(hf: Any, device_map: DeviceMap) -> None:
    """Every module a {module: device} map names exists in the loaded model: accelerate ignores unknown names,
    so a typo would silently leave the model where the default put it."""
    if not isinstance(device_map, dict):
        return
    names = {name for name, _ in hf.named_modules()}
    for module in device_map:
        if module and module not in names:
            example = next((n for n in sorted(names) if n.count(".") == 1), "model.layers")
            raise ModelError(
                f"device map names '{module[:60]}', which is not a module of this model (e.g. '{example}'): "
                "fix the module name"
            )


def _load_pretrained(
    source: str, dev: torch.device, dt: torch.dtype, device_map: DeviceMap = None, **kwargs: Any
) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    if device_map is None:
        hf = AutoModelForCausalLM.from_pretrained(source, dtype=dt, **kwargs)
        hf.to(dev)  # type: ignore[arg-type]  # transformers' stub types `to` oddly
    else:  # sharded: accelerate moves activations between devices; offloaded weights stream from disk
        offload = cache_dir() / "offload" / hashlib.sha256(source.encode()).hexdigest()[:16]
        try:
            hf = AutoModelForCausalLM.from_pretrained(
                source, dtype=dt, device_map=device_map, offload_folder=str(offload), **kwargs
            )
        except (ValueError, KeyError, RuntimeError, NotImplementedError) as exc:
            first = first_line(exc)
            raise ModelError(f"cannot place the model with this device map: {first}") from None
        check_map_modules(hf, device_map)
    hf.eval()
    return hf, tokenizer


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a temporary sibling directory that replaces `target` only if the block succeeds.

    Caches (dequantised models, organisms) are therefore either complete or absent, even after a crash.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def portable_config(path: Path) -> None:
    """Make a saved `config.json` read the same by transformers 4 and 5.

    transformers 5 writes rope settings only as `rope_parameters`; transformers 4 ignores that key and
    silently falls back to rope_theta = 10,000 (SmolLM2 needs 100,000), so its outputs drift after a few
    tokens. This adds the transformers-4 keys (`rope_theta`, `rope_scaling`, and Gemma 3's
    `rope_local_base_freq`) beside `rope_parameters`, which transformers 5 keeps reading. The tokenizer's class
    is made one both read (`portable_tokenizer_config`). Idempotent.
    """
    portable_tokenizer_config(path)
    file = path / "config.json"
    cfg = json.loads(file.read_text())
    params = cfg.get("rope_parameters")
    if not isinstance(params, dict):
        return
    legacy: dict[str, Any] = {}
    if "rope_theta" in params:  # one rope for every layer
        full, local = params, None
    elif "full_attention" in params:  # per layer type (Gemma 3): global and sliding-window rope
        full, local = params["full_attention"], params.get("sliding_attention")
    else:
        warnings.warn(f"{file}: unknown rope_parameters layout; transformers 4 may read it wrong", stacklevel=2)
        return
    legacy["rope_theta"] = full["rope_theta"]
    if full.get("rope_type", "default") != "default":
        legacy["rope_scaling"] = {k: v for k, v in full.items() if k != "rope_theta"}
    if isinstance(local, dict) and "rope_theta" in local:
        legacy["rope_local_base_freq"] = local["rope_theta"]
    if any(cfg.get(k) != v for k, v in legacy.items()):
        file.write_text(json.dumps({**cfg, **legacy}, indent=2, sort_keys=True) + "\n")


def portable_tokenizer_config(path: Path) -> None:
    """transformers 5 saves a tokenizer.json-backed tokenizer as class `TokenizersBackend`, a name transformers 4
    does not know (its AutoTokenizer fails: "Tokenizer class TokenizersBackend does not exist"). That class is
    `PreTrainedTokenizerFast` in transformers 4 and an alias of it in 5, so that name loads the same tokenizer in
    both. Idempotent; a directory without tokenizer_config.json is left alone."""
    file = path / "tokenizer_config.json"
    if not file.is_file():
        return
    cfg = json.loads(file.read_text())
    if cfg.get("tokenizer_class") == "TokenizersBackend":
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
        file.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


def save_pretrained(hf: Any, tokenizer: Any, path: Path) -> None:
    """Save a model directory that transformers 4 and 5 both load correctly (see `portable_config`)."""
    hf.save_pretrained(path)
    tokenizer.save_pretrained(path)
    portable_config(Path(path))


def _gguf_cached_dir(gguf_path: Path) -> tuple[Path, str]:
    """Dequantise a GGUF once and keep an fp32 safetensors copy: ~20 s -> ~2 s per later load."""
    sha = file_sha256(gguf_path)
    target = cache_dir() / "models" / f"{gguf_path.stem}-{sha[:16]}"
    if (target / "config.json").exists() and any(target.glob("*.safetensors")):
        portable_config(target)  # copies made by earlier versions lack the transformers-4 keys
        return target, sha
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": gguf_path.name}
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), **kwargs)
        hf = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), **kwargs)
    except Exception as exc:  # noqa: BLE001 - surface as one line
        raise ModelError(f"cannot load GGUF file {gguf_path}: {str(exc).splitlines()[0]}") from None
    # GGUF-loaded models carry a quantizer config that blocks save_pretrained: the weights are already
    # dequantised, so drop it.
    if hasattr(hf.config, "quantization_config"):
        del hf.config.quantization_config
    hf.hf_quantizer = None  # type: ignore[assignment]
    hf.is_quantized = False  # type: ignore[assignment]
    with atomic_dir(target) as tmp:
        save_pretrained(hf, tokenizer, tmp)
    return target, sha


MIXED = "mixed"  # bf16 matmuls, fp32 residual stream, norms and steering


def open_model(
    source: str,
    name: str | None = None,
    *,
    device: str = "auto",
    dtype: str = "auto",
    layers_path: str | None = None,
    trust_remote_code: bool = False,
    system_role: bool = True,
    device_map: DeviceMap = None,
) -> Model:
    """Open a model from a concrete source: a `.gguf` file, a local model directory or a hub id.
    (Registry aliases are resolved one level up, by `registry.load_model`.) dtype `mixed`: loaded in float32,
    then every linear layer of the blocks and the LM head computes in bf16 (`core.mixed_precision`)."""
    model = _open(source, name, device, dtype, layers_path, trust_remote_code, system_role, device_map)
    if dtype == MIXED:
        mix_precision(model)
    return model


def _open(
    source: str,
    name: str | None,
    device: str,
    dtype: str,
    layers_path: str | None,
    trust_remote_code: bool,
    system_role: bool,
    device_map: DeviceMap,
) -> Model:
    dev, dt = resolve_device_dtype(device, dtype)
    placement = {"device_map": check_device_map(device_map)}
    name = name or source
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"GGUF file '{source}' does not exist; check the path or reinstall its package")
        cached, sha = _gguf_cached_dir(path)
        hf, tok = _load_pretrained(str(cached), dev, dt, **placement)
        return Model(hf, tok, name, f"sha256:{sha}", system_role, layers_path)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelError(f"directory '{source}' holds no config.json: point at a saved Hugging Face model")
        hf, tok = _load_pretrained(str(path), dev, dt, trust_remote_code=trust_remote_code, **placement)
        return Model(hf, tok, name, _fingerprint_dir(path), system_role, layers_path)
    try:
        hf, tok = _load_pretrained(source, dev, dt, trust_remote_code=trust_remote_code, **placement)
    except Exception as exc:  # noqa: BLE001 - offline or missing repo: one line
        first = first_line(exc)
        raise ModelError(
            f"cannot load '{source}' from the Hugging Face hub ({first}); download it first or pass a local directory"
        ) from None
    revision = getattr(hf.config, "_commit_hash", None) or "unknown"
    return Model(hf, tok, name, f"hub-revision:{revision}", system_role, layers_path)
