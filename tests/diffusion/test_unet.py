"""UNet presets: parameter counts against the architecture, resolution rules, class conditioning."""

import pytest
import torch

from raycollapse.diffusion.unet import (
    UNET_PRESETS,
    build_unet,
    count_parameters,
    get_spec,
    unet_kwargs,
)
from raycollapse.errors import UserInputError

torch.set_num_threads(1)  # 2 threads on 2 shared cores oversubscribe: up to 40x slower

# Reported counts (3-channel for the paper's presets, 1-channel for tiny), unconditional.
REPORTED = {
    "tiny": 1_112_801,
    "unet32": 7_126_275,
    "unet48": 16_012_419,
    "unet64": 28_447_235,
    "unet128": 113_673_219,
}


def expected_parameter_count(
    preset: str, *, channels: int, class_conditional: bool = False, num_classes: int = 10
) -> int:
    """Parameter count computed from the architecture description alone (not from diffusers).

    Checks that the built model is the architecture the preset describes:
    conv 3x3 = 9·in·out + out; ResNet block = 2 GroupNorms + 2 convs + time projection (+ a 1x1
    shortcut when widths differ); attention = GroupNorm + q, k, v, out projections with bias;
    a ``conv`` down/up sampler = one 3x3 conv; the up path concatenates the skip connections.
    """
    spec = get_spec(preset)
    ch, lpb, n = spec.block_out_channels, spec.layers_per_block, len(spec.block_out_channels)
    temb = 4 * ch[0]

    def conv3(i: int, o: int) -> int:
        return 9 * i * o + o

    def resnet(i: int, o: int) -> int:
        shortcut = i * o + o if i != o else 0
        return 2 * i + conv3(i, o) + (temb * o + o) + 2 * o + conv3(o, o) + shortcut

    def attention(c: int) -> int:
        return 2 * c + 4 * (c * c + c)

    total = conv3(channels, ch[0])  # conv_in
    total += (ch[0] * temb + temb) + (temb * temb + temb)  # sinusoidal -> MLP time embedding
    if class_conditional:
        total += (num_classes + 1) * temb
    prev = ch[0]
    for i, (out, kind) in enumerate(zip(ch, spec.down_block_types, strict=True)):
        for j in range(lpb):
            total += resnet(prev if j == 0 else out, out)
            total += attention(out) if kind.startswith("Attn") else 0
        total += conv3(out, out) if i < n - 1 else 0  # downsampler
        prev = out
    total += 2 * resnet(ch[-1], ch[-1]) + attention(ch[-1])  # mid block
    rev = ch[::-1]
    prev_out = rev[0]
    for i, (out, kind) in enumerate(zip(rev, spec.up_block_types, strict=True)):
        skip_in = rev[min(i + 1, n - 1)]
        for j in range(lpb + 1):
            skip = skip_in if j == lpb else out
            total += resnet((prev_out if j == 0 else out) + skip, out)
            total += attention(out) if kind.startswith("Attn") else 0
        total += conv3(out, out) if i < n - 1 else 0  # upsampler
        prev_out = out
    total += 2 * ch[0] + conv3(ch[0], channels)  # output GroupNorm + conv_out
    return total


def _on_meta(preset, resolution, channels, class_conditional=False, num_classes=10):
    """Build on the meta device: the real architecture, no memory or init time (unet128 is 114M)."""
    from diffusers import UNet2DModel

    kwargs = unet_kwargs(
        preset,
        resolution=resolution,
        channels=channels,
        class_conditional=class_conditional,
        num_classes=num_classes,
    )
    with torch.device("meta"):
        return UNet2DModel(**kwargs)


@pytest.mark.parametrize("preset", list(UNET_PRESETS))
@pytest.mark.parametrize("class_conditional", [False, True])
def test_parameter_count_matches_architecture(preset, class_conditional):
    channels, resolution = (1, 8) if preset == "tiny" else (3, 32)
    model = _on_meta(preset, resolution, channels, class_conditional)
    expected = expected_parameter_count(
        preset, channels=channels, class_conditional=class_conditional
    )
    assert count_parameters(model) == expected
    if not class_conditional:
        assert expected == REPORTED[preset]
    else:  # an (num_classes + 1) x 4c embedding, the +1 being the null label
        assert expected - REPORTED[preset] == 11 * 4 * get_spec(preset).block_out_channels[0]


def test_paper_preset_layout():
    spec = get_spec("unet64")
    assert spec.block_out_channels == (64, 64, 128, 128, 256, 256)
    assert spec.down_block_types[4] == "AttnDownBlock2D"
    assert [t for t in spec.down_block_types if t.startswith("Attn")] == ["AttnDownBlock2D"]
    assert spec.up_block_types[1] == "AttnUpBlock2D"
    assert [t for t in spec.up_block_types if t.startswith("Attn")] == ["AttnUpBlock2D"]
    assert spec.layers_per_block == 2 and spec.norm_num_groups == 16


def test_tiny_forward_shapes_and_seeded_init():
    a = build_unet(
        "tiny", resolution=16, channels=1, class_conditional=True, num_classes=10, seed=3
    )
    b = build_unet(
        "tiny", resolution=16, channels=1, class_conditional=True, num_classes=10, seed=3
    )
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        out = a(
            x, torch.tensor([5, 900]), class_labels=torch.tensor([3, 10])
        ).sample  # 10 = null label
    assert out.shape == x.shape


def test_unet32_runs_at_32():
    model = build_unet("unet32", resolution=32, channels=3, seed=0)
    with torch.no_grad():
        out = model(torch.randn(1, 3, 32, 32), torch.tensor([10])).sample
    assert out.shape == (1, 3, 32, 32)


@pytest.mark.parametrize(
    "preset, resolution, channels, fragment",
    [
        ("unet32", 8, 3, "multiple of 32"),
        ("tiny", 6, 1, "multiple of 4"),
        ("tiny", 8, 2, "channels must be 1"),
        ("unet9", 32, 3, "unknown model preset"),
    ],
)
def test_bad_model_settings(preset, resolution, channels, fragment):
    with pytest.raises(UserInputError, match=fragment):
        unet_kwargs(preset, resolution=resolution, channels=channels)
