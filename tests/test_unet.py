"""Tests for diffusion/model/unet.py and diffusion/model/attention.py: shapes, the cross-attention hook, saving."""

import pytest
import torch
import torch.nn.functional as F

from diffusion.model.attention import AttentionController, sliced_attention
from diffusion.model.unet import UNet, pooled_states

T, D = 6, 24  # text tokens, text embedding width


def make_unet(**kwargs) -> UNet:
    """A UNet with every weight perturbed: the zero-initialised output layers would otherwise hide
    what the attention layers do."""
    settings = dict(
        sample_size=16,
        channels=(16, 32),
        blocks_per_level=1,
        attention_resolutions=(8,),
        attention_heads=2,
        context_dim=D,
    )
    settings.update(kwargs)
    torch.manual_seed(0)
    unet = UNet(**settings).eval()
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return unet


def inputs(batch=2, size=16, seed=1):
    """Noisy images, timesteps, text embeddings and a key mask with some tokens hidden."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, size, size, generator=g)
    t = torch.tensor([10, 500][:batch] + [999] * max(0, batch - 2))
    context = torch.randn(batch, T, D, generator=g)
    mask = torch.ones(batch, T, dtype=torch.bool)
    mask[0, 3:] = False  # image 0 reads tokens 0-2 only
    if batch > 1:
        mask[1, -1] = False
    return x, t, context, mask


class Recorder(AttentionController):
    """Records every cross-attention call and its probabilities."""

    def __init__(self):
        self.calls = []

    def wants(self, site):
        return True

    def process(self, site, probabilities):
        self.calls.append((site.name, site.resolution, tuple(probabilities.shape), probabilities.clone(), site))
        return None


class AllOnFirstToken(AttentionController):
    """Every pixel reads only token 0."""

    def wants(self, site):
        return True

    def process(self, site, probabilities):
        edited = torch.zeros_like(probabilities)
        edited[..., 0] = 1
        return edited


@pytest.mark.parametrize(
    "settings, size",
    [
        (dict(channels=(16, 32), blocks_per_level=1, attention_resolutions=(8,)), 16),
        (dict(channels=(16, 32), blocks_per_level=2, attention_resolutions=(16, 8)), 16),
        (dict(channels=(8, 16, 32), blocks_per_level=2, attention_resolutions=(16, 4)), 16),
        (dict(channels=(16,), blocks_per_level=1, attention_resolutions=(), sample_size=8), 8),
        (dict(channels=(16, 16, 32), blocks_per_level=1, attention_resolutions=(32,), sample_size=32), 32),
    ],
)
def test_output_has_the_shape_of_the_input(settings, size):
    unet = make_unet(**settings)
    x, t, context, mask = inputs(size=size)
    with torch.no_grad():
        out = unet(x, t, context, mask)
    assert out.shape == x.shape
    assert torch.isfinite(out).all()


def test_scalar_timestep_and_no_mask():
    unet = make_unet()
    x, _, context, _ = inputs()
    with torch.no_grad():
        scalar = unet(x, 500, context)
        vector = unet(x, torch.tensor([500, 500]), context)
    assert scalar.shape == x.shape
    torch.testing.assert_close(scalar, vector)


def test_output_depends_on_the_text():
    unet = make_unet()
    x, t, context, mask = inputs()
    with torch.no_grad():
        a = unet(x, t, context, mask)
        b = unet(x, t, context + 1, mask)
    assert not torch.allclose(a, b)


@pytest.mark.parametrize(
    "settings, expected",
    [
        (
            dict(channels=(16, 32), blocks_per_level=1, attention_resolutions=(8,)),
            [("down.1.attn.0", 8), ("mid.attn.0", 8), ("up.1.attn.0", 8)],
        ),
        (
            dict(channels=(8, 16, 32), blocks_per_level=2, attention_resolutions=(16, 4)),
            [
                ("down.0.attn.0", 16),
                ("down.0.attn.1", 16),
                ("down.2.attn.0", 4),
                ("down.2.attn.1", 4),
                ("mid.attn.0", 4),
                ("up.2.attn.0", 4),
                ("up.2.attn.1", 4),
                ("up.0.attn.0", 16),
                ("up.0.attn.1", 16),
            ],
        ),
    ],
)
def test_cross_attention_queries_are_pixels_and_keys_are_tokens(settings, expected):
    unet = make_unet(**settings)
    x, t, context, mask = inputs()
    recorder = Recorder()
    with torch.no_grad():
        unet(x, t, context, mask, attention_controller=recorder, step=3)
    heads = unet.config.attention_heads
    assert [(name, resolution) for name, resolution, *_ in recorder.calls] == [(n, (r, r)) for n, r in expected]
    for _name, (h, w), shape, probabilities, site in recorder.calls:
        assert shape == (2, heads, h * w, T)  # (batch, heads, queries = pixels, keys = tokens)
        torch.testing.assert_close(probabilities.sum(-1), torch.ones(2, heads, h * w))
        assert (probabilities >= 0).all()
        # masked keys get no attention at all; visible ones get some
        assert (probabilities[0, :, :, 3:] == 0).all()
        assert (probabilities[1, :, :, -1] == 0).all()
        assert (probabilities[0, :, :, :3] > 0).all() and (probabilities[1, :, :, :-1] > 0).all()
        assert site.step == 3


def test_site_names_are_stable_across_instances():
    names = []
    for _ in range(2):
        recorder = Recorder()
        with torch.no_grad():
            make_unet()(*inputs(), attention_controller=recorder)
        names.append([c[0] for c in recorder.calls])
    assert names[0] == names[1]
    assert len(set(names[0])) == len(names[0])


def test_without_step_the_site_step_is_none():
    recorder = Recorder()
    with torch.no_grad():
        make_unet()(*inputs(), attention_controller=recorder)
    assert all(call[4].step is None for call in recorder.calls)


@pytest.mark.parametrize(
    "settings",
    [
        dict(channels=(16, 32), blocks_per_level=1, attention_resolutions=(8,)),
        dict(channels=(8, 16, 32), blocks_per_level=2, attention_resolutions=(16, 4)),
    ],
)
def test_reading_probabilities_does_not_change_the_output(settings):
    """The explicit softmax path (a controller that returns None) matches the fused SDPA path."""
    unet = make_unet(**settings)
    x, t, context, mask = inputs()
    with torch.no_grad():
        fused = unet(x, t, context, mask)
        explicit = unet(x, t, context, mask, attention_controller=Recorder())
        base = unet(x, t, context, mask, attention_controller=AttentionController())
    torch.testing.assert_close(explicit, fused, rtol=1e-5, atol=1e-5)
    assert torch.equal(base, fused)  # the base controller wants nothing: the same fused path


def test_editing_probabilities_changes_the_output():
    unet = make_unet()
    x, t, context, mask = inputs()
    with torch.no_grad():
        plain = unet(x, t, context, mask)
        edited = unet(x, t, context, mask, attention_controller=AllOnFirstToken())
    assert (edited - plain).abs().max() > 1e-3


def test_edited_probabilities_are_the_ones_used():
    """With all attention on token 0, the other tokens' embeddings no longer matter."""
    unet = make_unet()
    x, t, context, mask = inputs()
    other = context.clone()
    other[:, 1:] = torch.randn_like(other[:, 1:])
    with torch.no_grad():
        a = unet(x, t, context, mask, attention_controller=AllOnFirstToken())
        b = unet(x, t, other, mask, attention_controller=AllOnFirstToken())
        c = unet(x, t, other, mask)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)


def test_controller_that_wants_nothing_is_never_asked_to_process():
    class Refuses(AttentionController):
        def __init__(self):
            self.asked = []

        def wants(self, site):
            self.asked.append(site.name)
            return False

        def process(self, site, probabilities):
            raise AssertionError("process called although wants() said False")

    controller = Refuses()
    unet = make_unet()
    x, t, context, mask = inputs()
    with torch.no_grad():
        out = unet(x, t, context, mask, attention_controller=controller)
        plain = unet(x, t, context, mask)
    assert controller.asked == ["down.1.attn.0", "mid.attn.0", "up.1.attn.0"]
    assert torch.equal(out, plain)


def test_controller_sees_only_the_sites_it_wants():
    class MidOnly(Recorder):
        def wants(self, site):
            return site.name == "mid.attn.0"

    controller = MidOnly()
    with torch.no_grad():
        make_unet()(*inputs(), attention_controller=controller)
    assert [c[0] for c in controller.calls] == ["mid.attn.0"]


def test_save_and_load_round_trip(tmp_path):
    unet = make_unet(channels=(8, 16, 32), blocks_per_level=2, attention_resolutions=(16, 4))
    unet.save_pretrained(tmp_path / "unet")
    files = {p.name for p in (tmp_path / "unet").iterdir()}
    assert "config.json" in files
    assert any(name.endswith(".safetensors") for name in files)
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in files)

    loaded = UNet.from_pretrained(tmp_path / "unet").eval()
    assert list(loaded.config.channels) == [8, 16, 32]
    assert loaded.config.blocks_per_level == 2
    assert list(loaded.config.attention_resolutions) == [16, 4]
    x, t, context, mask = inputs()
    with torch.no_grad():
        assert torch.equal(loaded(x, t, context, mask), unet(x, t, context, mask))
    for (name, a), (_, b) in zip(unet.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


def test_position_embedding_tells_the_attention_where_it_is(tmp_path):
    """Same weights with and without the fixed 2D embedding give different outputs, so the
    embedding reaches the attention. It is no weight: it is rebuilt from the saved config."""
    plain = make_unet(position_embedding=False)
    placed = make_unet(position_embedding=True)
    placed.load_state_dict(plain.state_dict())
    assert "down.1.attentions.0.position" not in placed.state_dict()
    assert placed.down[1].attentions[0].position.shape == (1, 8 * 8, 32)
    x, t, context, mask = inputs()
    with torch.no_grad():
        assert not torch.allclose(placed(x, t, context, mask), plain(x, t, context, mask))
    placed.save_pretrained(tmp_path / "unet")
    loaded = UNet.from_pretrained(tmp_path / "unet").eval()
    assert loaded.config.position_embedding is True
    with torch.no_grad():
        assert torch.equal(loaded(x, t, context, mask), placed(x, t, context, mask))


@pytest.mark.parametrize("start", [0, D // 2])
def test_values_read_the_context_from_value_context_start(tmp_path, start):
    """Each image reads one token, so its attention is 1 whatever the keys: then the output
    follows the features the values read and no others."""
    unet = make_unet(value_context_start=start)
    assert unet.mid_attention.cross_attention.to_v.in_features == D - start
    x, t, context, _ = inputs()
    mask = torch.zeros(2, T, dtype=torch.bool)
    mask[:, 2] = True
    front, back = context.clone(), context.clone()
    front[..., : D // 2] += 1.0
    back[..., D // 2 :] += 1.0
    with torch.no_grad():
        out = unet(x, t, context, mask)
        assert torch.equal(unet(x, t, front, mask), out) == (start == D // 2)
        assert not torch.allclose(unet(x, t, back, mask), out)
        # with every token readable the keys see the whole context again
        assert not torch.allclose(unet(x, t, front), unet(x, t, context))
    unet.save_pretrained(tmp_path / "unet")
    loaded = UNet.from_pretrained(tmp_path / "unet").eval()
    assert loaded.config.value_context_start == start
    with torch.no_grad():
        assert torch.equal(loaded(x, t, front, mask), unet(x, t, front, mask))


@pytest.mark.parametrize("resolutions, token_valued", [(None, {16, 8, 4}), ((16,), {16}), ((8, 4), {8, 4})])
def test_value_context_resolutions_picks_the_levels(resolutions, token_valued):
    unet = make_unet(
        channels=(8, 16, 32),
        attention_resolutions=(16, 8),
        value_context_start=D // 2,
        value_context_resolutions=resolutions,
    )
    widths = {}
    for module in unet.modules():
        if hasattr(module, "cross_attention"):
            widths.setdefault(module.cross_attention.name, module.cross_attention.to_v.in_features)
    levels = {"down.0": 16, "up.0": 16, "down.1": 8, "up.1": 8, "mid": 4}
    for name, width in widths.items():
        side = levels[name.rsplit(".attn", 1)[0]]
        assert width == (D - D // 2 if side in token_valued else D), name


@pytest.mark.parametrize("mask_rows", [None, 1, 6])
def test_sliced_attention_is_attention_in_value_and_gradient(mask_rows):
    """Training on CPU uses plain ops over batch slices: same output and gradients as the fused
    kernel, whatever the slicing (one row at a time, uneven slices, the whole batch)."""
    torch.manual_seed(0)
    q, k, v = torch.randn(6, 2, 9, 4), torch.randn(6, 2, 5, 4), torch.randn(6, 2, 5, 4)
    mask = None
    if mask_rows:
        mask = torch.rand(mask_rows, 1, 1, 5) > 0.4
        mask[..., 0] = True  # every query can read something
    reference_inputs = [t.clone().requires_grad_(True) for t in (q, k, v)]
    reference = F.scaled_dot_product_attention(*reference_inputs, attn_mask=mask)
    reference.square().sum().backward()
    for chunk in (2 * 9 * 5, 4 * 2 * 9 * 5, 10**6):  # 1 row, slices of 4 and 2, all 6 rows at once
        inputs = [t.clone().requires_grad_(True) for t in (q, k, v)]
        out = sliced_attention(*inputs, mask, chunk=chunk)
        out.square().sum().backward()
        torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
        for mine, theirs in zip(inputs, reference_inputs):
            torch.testing.assert_close(mine.grad, theirs.grad, atol=1e-5, rtol=1e-5)


def test_attend_takes_the_fused_kernel_without_a_gradient(monkeypatch):
    """Sampling keeps the fused kernel (bit for bit what it was); only training slices."""
    import diffusion.model.attention as attention_module

    calls = []
    monkeypatch.setattr(
        attention_module, "sliced_attention", lambda *a, **k: calls.append(1) or sliced_attention(*a, **k)
    )
    q = torch.randn(2, 2, 4, 4)
    out = attention_module.attend(q, q, q)
    assert calls == [] and torch.equal(out, F.scaled_dot_product_attention(q, q, q))
    attention_module.attend(q.requires_grad_(True), q, q)
    assert calls == [1]


def test_unet_settings_follow_the_config():
    from diffusion.config import load_config
    from diffusion.model.unet import unet_settings

    cfg = load_config(None, ["model.channels=[16,32]", "model.attention_resolutions=[16]", "data.resolution=32"])
    settings = unet_settings(cfg, context_dim=24, value_context_start=12)
    assert settings["channels"] == (16, 32) and settings["attention_resolutions"] == (16,)
    assert settings["sample_size"] == 32 and settings["context_dim"] == 24
    assert settings["value_context_start"] == 0  # values read the whole context unless the option is on
    on = load_config(None, ["model.values_from_token_embeddings=true", "model.token_value_resolutions=[8]"])
    settings = unet_settings(on, context_dim=24, value_context_start=12)
    assert settings["value_context_start"] == 12 and settings["value_context_resolutions"] == (8,)
    unet = UNet(**unet_settings(cfg, context_dim=24))
    assert unet.resolutions == [32, 16] and unet.config.context_dim == 24


def test_pooled_text_starts_as_the_model_without_it_and_reads_the_readable_tokens_mean():
    torch.manual_seed(0)
    plain = UNet(sample_size=16, channels=(16, 32), attention_resolutions=(8,), attention_heads=2, context_dim=D)
    torch.manual_seed(0)
    pooled = UNet(
        sample_size=16,
        channels=(16, 32),
        attention_resolutions=(8,),
        attention_heads=2,
        context_dim=D,
        pooled_text=True,
    )
    # the other weights are drawn as without it, and its projection starts at zero
    assert all(torch.equal(value, pooled.state_dict()[key]) for key, value in plain.state_dict().items())
    x, t, context, mask = inputs()
    with torch.no_grad():
        torch.testing.assert_close(plain(x, t, context, mask), pooled(x, t, context, mask), rtol=0, atol=0)

    unet = make_unet(pooled_text=True)
    expected = torch.stack([context[b][mask[b]].mean(0) for b in range(len(context))])
    torch.testing.assert_close(pooled_states(context, mask), expected)
    # a masked token reaches neither path; a readable one reaches the pooled path even with
    # cross-attention ignoring it
    masked = context.clone()
    masked[~mask] += 5
    with torch.no_grad():
        torch.testing.assert_close(unet(x, t, masked, mask), unet(x, t, context, mask))
        unet_no_pool = make_unet(pooled_text=True)
        unet_no_pool.text_to_time.weight.zero_()
        unet_no_pool.text_to_time.bias.zero_()

        class Blind(AttentionController):  # every pixel reads the first token only
            def wants(self, site):
                return True

            def process(self, site, probabilities):
                out = torch.zeros_like(probabilities)
                out[..., 0] = 1
                return out

        changed = context.clone()
        changed[:, 1:] += 1  # the first token kept: cross-attention under Blind sees no change
        assert not torch.allclose(unet(x, t, changed, mask, Blind()), unet(x, t, context, mask, Blind()))
        torch.testing.assert_close(
            unet_no_pool(x, t, changed, mask, Blind()), unet_no_pool(x, t, context, mask, Blind())
        )
