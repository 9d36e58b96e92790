"""Control vectors in the GGUF layout that llama.cpp (`--control-vector`, `--control-vector-scaled`) and repeng
(`ControlVector.export_gguf` / `import_gguf`) read and write, to and from this tool's direction files.

Layout: GGUF architecture `controlvector`, key `controlvector.model_hint` (the model's architecture, e.g.
"llama"), key `controlvector.layer_count`, and one float32 tensor `direction.N` of size d per steered layer.
llama.cpp adds `direction.N` (times the file's strength) to the output of decoder block N, counting blocks from
0, and has no slot for N = 0 (it never steers the first block's output); that is this tool's layer numbering
("layer i = output of block i"), so layer numbers carry over unchanged and layer 0 cannot be exported. The
vector is added as is: its sign and scale are the steering (this tool's `-alpha x v` with the alpha folded in;
a negative alpha removes refusal). Imported vectors become unit directions with their norms kept in the
metadata; such files have no residual norms, so relative alphas are refused with a clear error.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import __version__
from ..errors import VectorFileError
from .directions import DirectionBank

ARCH = "controlvector"
MAX_LAYER = 10_000  # far above any model's depth (the deepest have ~200 blocks); larger numbers overflow int64


def export_gguf(
    bank: DirectionBank,
    path: str | Path,
    layers: Sequence[int],
    alpha: float,
    alpha_unit: str = "absolute",
    model_hint: str = "llama",
) -> Path:
    """Write `alpha x v_L` (relative: `alpha x resid_norm_L x v_L`) for each layer L as a llama.cpp control
    vector. Returns the path."""
    import gguf

    path = Path(path)
    if path.suffix != ".gguf":
        raise VectorFileError(f"control vectors are GGUF files: name the output '{path.with_suffix('.gguf')}'")
    if not path.parent.is_dir():
        raise VectorFileError(f"cannot write '{path}': directory '{path.parent}' does not exist")
    if not layers:
        raise VectorFileError("name at least one layer to export")
    if 0 in layers:
        raise VectorFileError("llama.cpp cannot steer layer 0 (the first block's output): export layers >= 1")
    if alpha_unit not in ("absolute", "relative"):
        raise VectorFileError(f"unknown alpha unit '{alpha_unit}': use absolute or relative")
    if alpha == 0:  # all-zero vectors: import_gguf refuses them, and they steer nothing
        raise VectorFileError("alpha 0 writes all-zero vectors that steer nothing: pass a non-zero alpha")
    writer = gguf.GGUFWriter(str(path), ARCH)
    writer.add_string(f"{ARCH}.model_hint", model_hint)
    writer.add_uint32(f"{ARCH}.layer_count", len(layers))
    scales = {}
    for layer in sorted(set(layers)):
        scale = alpha * (bank.resid_norm(layer) if alpha_unit == "relative" else 1.0)
        scales[layer] = scale
        vector = (bank.direction(layer).double() * scale).float().numpy()
        writer.add_tensor(f"direction.{layer}", np.ascontiguousarray(vector, dtype=np.float32))
    provenance = {
        "tool": f"crystallized-safety {__version__}",
        "source_model": bank.metadata.get("model_id", ""),
        "alpha": alpha,
        "alpha_unit": alpha_unit,
        "scales": {str(k): v for k, v in scales.items()},
        "convention": "direction.N is added to the output of block N (0-based); sign harmful - harmless",
    }
    writer.add_string("csafety.provenance", json.dumps(provenance))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def import_gguf(path: str | Path) -> DirectionBank:
    """A llama.cpp / repeng control vector as a DirectionBank: unit directions per layer, their norms and the
    producing tool in the metadata, no residual norms (relative alphas are refused)."""
    from gguf import GGUFReader

    path = Path(path)
    if not path.is_file():
        raise VectorFileError(f"control vector file '{path}' does not exist")
    try:
        reader = GGUFReader(str(path))
    except Exception as exc:  # noqa: BLE001 - any parse failure is a bad file
        raise VectorFileError(f"'{path}' is not a readable GGUF file ({type(exc).__name__}): export it again") from None
    _check_header(reader, path)
    rows = _direction_rows(reader, path)
    if not rows:
        raise VectorFileError(f"'{path}' holds no direction.N tensors: not a control vector")
    if 0 in rows or len({v.shape for v in rows.values()}) != 1:
        raise VectorFileError(f"'{path}' is inconsistent: llama.cpp numbers layers from 1 and needs one vector size")
    count = _field_value(reader, f"{ARCH}.layer_count")
    if count is not None and count != len(rows):
        raise VectorFileError(f"'{path}' declares layer_count {count} but holds {len(rows)} direction.N tensors")
    layers = sorted(rows)
    matrix = torch.tensor(np.stack([rows[k] for k in layers]))
    norms = matrix.norm(dim=-1)
    if not torch.isfinite(matrix).all() or (norms == 0).any():
        raise VectorFileError(f"'{path}' holds NaN, inf or all-zero vectors")
    hint = _field_value(reader, f"{ARCH}.model_hint")
    hint = hint if isinstance(hint, str) else ""
    metadata = {
        "source": str(path),
        "source_tool": "llama.cpp/repeng control vector (GGUF)",
        "model_hint": hint,
        "gguf_norms": json.dumps({str(k): float(n) for k, n in zip(layers, norms)}),
        "convention": "layer N = output of block N (0-based), as llama.cpp; sign as in the file",
    }
    return DirectionBank(directions=(matrix / norms[:, None]).float(), layers=layers, metadata=metadata)


def _field_value(reader: Any, key: str) -> Any:
    """A scalar GGUF field as str or int; None when absent (or not a scalar)."""
    field = reader.fields.get(key)
    if field is None or not field.data:
        return None
    part = field.parts[field.data[0]]
    if getattr(part, "dtype", None) == np.uint8:
        return bytes(part).decode("utf-8", "replace")
    return int(part[0]) if len(part) == 1 else None


def _check_header(reader: Any, path: Path) -> None:
    """The file says it is a control vector: a model file (`llama`) or a file naming no architecture is refused,
    since its tensors are weights, not directions."""
    arch = _field_value(reader, "general.architecture")
    if arch != ARCH:
        found = "no architecture" if arch is None else f"architecture '{str(arch)[:40]}'"
        raise VectorFileError(f"'{path}' has {found}, not '{ARCH}': it is not a llama.cpp control vector")


def _direction_rows(reader: Any, path: Path) -> dict[int, np.ndarray]:
    """Each `direction.N` tensor as a float64 vector; N a layer number up to MAX_LAYER; 1-D tensors only."""
    rows: dict[int, np.ndarray] = {}
    for tensor in reader.tensors:
        name = str(tensor.name)
        digits = name.removeprefix("direction.")
        if not name.startswith("direction.") or not digits.isdigit():
            raise VectorFileError(f"'{path}' holds tensor '{name[:60]}': a control vector has only direction.N tensors")
        if len(digits) > 5 or int(digits) > MAX_LAYER:
            raise VectorFileError(f"'{path}' holds tensor '{name[:60]}': layer numbers go up to {MAX_LAYER:,}")
        data = np.asarray(tensor.data)
        if data.ndim != 1 and sum(int(n) > 1 for n in data.shape) > 1:
            raise VectorFileError(f"'{path}': tensor '{name}' has shape {tuple(data.shape)}, not one vector")
        rows[int(digits)] = data.astype(np.float64).reshape(-1)
    return rows
