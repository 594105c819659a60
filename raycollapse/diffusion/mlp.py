"""The vector denoiser: a small MLP with a sinusoidal time embedding (preset ``mlp``).

For vector data (``data.source=mog``) the noise predictor ``eps_theta(x_t, t)`` maps a batch
``N x d`` to ``N x d``. It is a diffusers ``ModelMixin`` / ``ConfigMixin`` like ``UNet2DModel``,
with the same call ``model(x_t, t, class_labels=...).sample``, so the DDPM loss, the trainer,
the EMA, the checkpoints (``save_pretrained`` / ``from_pretrained``) and the DDPM / DDIM
samplers are the image ones.

Architecture: the timestep goes through the transformer sinusoidal embedding (diffusers'
``get_timestep_embedding``, as the UNet's ``Timesteps`` with ``flip_sin_to_cos=True``) and a
two-layer SiLU MLP; ``x`` goes through a linear layer to ``hidden`` units, then ``depth``
residual blocks ``h <- h + W2 SiLU(W1 SiLU(LayerNorm(h)) + E t)``, then ``LayerNorm``, SiLU
and a linear layer back to ``d``. The last layer starts at zero (the untrained model predicts
no noise). Class-conditional models add an ``nn.Embedding(num_classes + 1, hidden)`` to the
time embedding (index ``num_classes`` = the null label), as the UNet presets do.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import get_timestep_embedding
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput


@dataclass
class VectorDenoiserOutput(BaseOutput):
    """``sample``: the predicted noise, ``N x d``."""

    sample: torch.Tensor


class _Block(torch.nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(hidden)
        self.lin1 = torch.nn.Linear(hidden, hidden)
        self.time = torch.nn.Linear(hidden, hidden)
        self.lin2 = torch.nn.Linear(hidden, hidden)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        a = self.lin1(torch.nn.functional.silu(self.norm(h))) + self.time(emb)
        return h + self.lin2(torch.nn.functional.silu(a))


class VectorDenoiser(ModelMixin, ConfigMixin):
    """``eps_theta(x_t, t[, class])`` for vectors of dimension ``dim`` (module docstring)."""

    @register_to_config
    def __init__(
        self,
        dim: int = 2,
        hidden: int = 128,
        depth: int = 3,
        time_embed_dim: int = 64,
        num_class_embeds: int | None = None,
    ) -> None:
        super().__init__()
        self.inp = torch.nn.Linear(dim, hidden)
        self.time_mlp = torch.nn.Sequential(
            torch.nn.Linear(time_embed_dim, hidden),
            torch.nn.SiLU(),
            torch.nn.Linear(hidden, hidden),
        )
        self.class_embedding = (
            torch.nn.Embedding(num_class_embeds, hidden) if num_class_embeds else None
        )
        self.blocks = torch.nn.ModuleList(_Block(hidden) for _ in range(depth))
        self.out_norm = torch.nn.LayerNorm(hidden)
        self.out = torch.nn.Linear(hidden, dim)
        torch.nn.init.zeros_(self.out.weight)
        torch.nn.init.zeros_(self.out.bias)

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | int,
        class_labels: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> VectorDenoiserOutput | tuple[torch.Tensor]:
        """Predicted noise for ``sample`` (``N x d``) at ``timestep`` (a scalar or ``N`` values)."""
        t = torch.as_tensor(timestep, device=sample.device)
        if t.ndim == 0:
            t = t.expand(sample.shape[0])
        temb = get_timestep_embedding(
            t, int(self.config.time_embed_dim), flip_sin_to_cos=True, downscale_freq_shift=0
        )
        emb = self.time_mlp(temb.to(sample.dtype))
        if self.class_embedding is not None:
            if class_labels is None:
                raise ValueError("a class-conditional VectorDenoiser needs class_labels")
            emb = emb + self.class_embedding(class_labels)
        h = self.inp(sample)
        for block in self.blocks:
            h = block(h, emb)
        out = self.out(torch.nn.functional.silu(self.out_norm(h)))
        return VectorDenoiserOutput(sample=out) if return_dict else (out,)
