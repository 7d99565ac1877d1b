"""Tuning tables keyed by GPU generation, shared by the kernel backends.

Block shapes that are fastest on one GPU can fail to compile on another (a Hopper GPU gives a
block 227 KiB of shared memory, an A100 163 KiB, an L4 99 KiB), so a backend's tables hold a
``default`` entry per key, measured to fit everywhere it is used, and per generation the entries
measured faster there. The generation is that of the GPU the kernels are traced for: the abstract
device of the current abstract mesh when it names one (lowering for a GPU on a machine without
one), else the default device.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Hashable, Iterator, Mapping
from typing import Any

import jax

DEFAULT = "default"
HOPPER = "hopper"  # sm90: H100, H200, H800, H20, GH200
GENERATIONS = (DEFAULT, HOPPER)

_HOPPER_KINDS = re.compile(r"\b(G?H(100|200|800|20))\b")


def generation_of(device_kind: str | None, compute_capability: str | None = None) -> str:
    """The generation (one of ``GENERATIONS``) of a device, from its compute capability when
    known ("9.0"), else from its kind ("NVIDIA H100 80GB HBM3")."""
    if compute_capability:
        return HOPPER if compute_capability.split(".")[0] == "9" else DEFAULT
    if device_kind and _HOPPER_KINDS.search(device_kind):
        return HOPPER
    return DEFAULT


def gpu_generation() -> str:
    """The generation of the GPU that the kernels being traced target (``DEFAULT`` on a platform
    without one)."""
    mesh = jax.sharding.get_abstract_mesh()
    abstract_device = None if mesh.empty else getattr(mesh, "abstract_device", None)
    if abstract_device is not None:
        return generation_of(abstract_device.device_kind)
    if jax.default_backend() != "gpu":
        return DEFAULT
    device = jax.devices()[0]
    return generation_of(device.device_kind, getattr(device, "compute_capability", None))


@dataclasses.dataclass(frozen=True)
class TuningTable:
    """Values by key, with per-generation entries that replace the default ones."""

    default: Mapping[Hashable, Any]
    by_generation: Mapping[str, Mapping[Hashable, Any]] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        for generation, entries in self.by_generation.items():
            if generation not in GENERATIONS:
                raise ValueError(f"unknown generation {generation!r}; one of {GENERATIONS}")
            if not set(entries) <= set(self.default):
                raise ValueError(f"{generation} entries without a default: "
                                 f"{sorted(set(entries) - set(self.default))}")

    def lookup(self, key: Hashable, generation: str | None = None):
        """The value for ``key`` on ``generation`` (default: the traced-for GPU's)."""
        generation = gpu_generation() if generation is None else generation
        return self.by_generation.get(generation, {}).get(key, self.default[key])

    def values(self, key: Hashable) -> Iterator[Any]:
        """Every distinct value ``key`` takes on some generation (to compile each in tests)."""
        seen = []
        for generation in GENERATIONS:
            value = self.lookup(key, generation)
            if value not in seen:
                seen.append(value)
                yield value

    def with_entries(self, generation: str, entries: Mapping[Hashable, Any]) -> TuningTable:
        """A copy with ``entries`` replacing the table's for ``generation``."""
        merged = {**self.by_generation.get(generation, {}), **entries}
        return dataclasses.replace(self, by_generation={**self.by_generation,
                                                        generation: merged})
