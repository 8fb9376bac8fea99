"""The TiC experiment's baselines (sinklora_ext.tic.baselines): any resolution, their sizes, gradients,
and the ViT's position embeddings."""

import pytest
import torch

from sinklora_ext.tic.baselines import BASELINES, ConvNet, VisionTransformer

RESOLUTIONS = [(28, 28), (42, 42), (56, 56), (17, 23)]


@pytest.mark.parametrize("name", sorted(BASELINES))
@pytest.mark.parametrize("in_channels", [1, 3])
def test_logits_at_any_resolution(name, in_channels):
    torch.manual_seed(0)
    model = BASELINES[name](10, in_channels).eval()
    for h, w in RESOLUTIONS:
        logits = model(torch.randn(3, in_channels, h, w))
        assert logits.shape == (3, 10) and torch.isfinite(logits).all(), (name, h, w)


@pytest.mark.parametrize("name, expected", [("cnn-micro", 113_150), ("vit-micro", 121_450)])
def test_parameter_counts(name, expected):
    """The counts the module docstring states, within 10% of the tic-micro preset's (the
    experiment compares models of about the same size)."""
    from sinklora_ext.tic import build_model

    count = sum(p.numel() for p in BASELINES[name](10, 1).parameters())
    tic = sum(p.numel() for p in build_model("tic-micro").parameters())
    assert count == expected and abs(count - tic) <= 0.1 * tic


def test_size_kwargs():
    def count(model):
        return sum(p.numel() for p in model.parameters())

    assert count(ConvNet(10, 1, width=16)) < count(ConvNet(10, 1)) < count(ConvNet(10, 1, depth=4))
    assert count(VisionTransformer(10, 1, width=32)) < count(VisionTransformer(10, 1)) \
        < count(VisionTransformer(10, 1, depth=8))
    with pytest.raises(ValueError, match="multiple of heads"):
        VisionTransformer(10, 1, width=30, heads=4)


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_every_parameter_gets_a_gradient(name):
    torch.manual_seed(0)
    model = BASELINES[name](10, 1).train()
    x, labels = torch.randn(4, 1, 17, 23), torch.tensor([0, 3, 7, 9])
    torch.nn.functional.cross_entropy(model(x), labels).backward()
    for param_name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, param_name


def test_position_embedding_is_the_learned_one_at_the_training_resolution():
    torch.manual_seed(0)
    vit = VisionTransformer(10, 1)  # 28x28 images, 4x4 patches: a 7x7 token grid
    assert vit.train_grid == 7
    assert torch.equal(vit.position_embedding((7, 7)), vit.pos_embed)
    resampled = vit.position_embedding((14, 10))
    assert resampled.shape == (1, 40, 14, 10)
    # bicubic resampling of a constant map is that constant
    with torch.no_grad():
        vit.pos_embed.fill_(0.25)
    assert torch.allclose(vit.position_embedding((11, 6)), torch.full((1, 40, 11, 6), 0.25))


def test_vit_pads_to_whole_patches():
    """17x23 is zero-padded to 20x24 (5x6 tokens): the same logits as padding it by hand."""
    torch.manual_seed(0)
    vit = VisionTransformer(10, 1).eval()
    x = torch.randn(2, 1, 17, 23)
    padded = torch.zeros(2, 1, 20, 24)
    padded[:, :, :17, :23] = x
    assert torch.allclose(vit(x), vit(padded), atol=1e-6)
