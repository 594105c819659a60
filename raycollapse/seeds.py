"""Seed derivation: every random choice derives from the run seed and the indices that name it.

docs/design.md, "Seeding": a seed is a hash (numpy's ``SeedSequence``) of integers such as (run
seed, iteration, purpose) or (seed, sample id) — never a counter or a worker's own stream — so a
pool, a selection or a training batch order is the same whatever the number of actors, the batch
size or the restarts. This is the one place seeds are derived.
"""

from __future__ import annotations

import numpy as np

__all__ = ["derive_rng", "derive_seed"]


def derive_seed(*parts: int, bits: int = 32) -> int:
    """A seed hashed from ``parts`` alone: 32 bits (numpy) or 63 bits (a torch generator).

    ``bits=32`` is the first word of ``SeedSequence(parts)``; ``bits=63`` combines the first two
    words as ``(w0 << 31) ^ w1`` (below 2**63, a valid ``torch.Generator.manual_seed``).
    """
    words = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint32)
    if bits == 32:
        return int(words[0])
    if bits == 63:
        return (int(words[0]) << 31) ^ int(words[1])
    raise ValueError(f"bits must be 32 or 63, got {bits}")


def derive_rng(*parts: int) -> np.random.Generator:
    """A numpy generator seeded by the hash of ``parts`` alone (``SeedSequence(parts)``), for a
    choice that draws many numbers (e.g. the fresh real images of an iteration)."""
    return np.random.default_rng(np.random.SeedSequence([int(p) for p in parts]))
