"""Attention controllers: recording per-word maps, reweighting, injection and local blend
(Prompt-to-Prompt), and which tokens a word swap changes."""

from pathlib import Path

import numpy as np
import pytest
import torch

from diffusion.config import DEFAULT_WEIGHT_STEPS
from diffusion.control.controllers import (
    AttentionInjector,
    AttentionRecorder,
    AttentionReweighter,
    ControllerChain,
    LocalBlend,
    SiteFilter,
    changed_tokens,
)
from diffusion.control.prompts import align_tokens, object_phrase, split_words, swap_kind
from diffusion.control.weighting import Weighting, condition
from diffusion.errors import UserError
from diffusion.model.attention import AttentionCall, AttentionController, AttentionSite, CrossAttention, GraphRequest
from diffusion.sampling.pipeline import MapOptions, Pipeline, merge_word_maps
from diffusion.sampling.settings import SamplingSettings
from diffusion.training.clip import fit_tokenizer


# float32: these tests compare images drawn through the fused attention kernel with images drawn
# through the explicit softmax an attention controller needs; in bf16 the two round differently.
@pytest.fixture(scope="module")
def pipe(tiny_model):
    return Pipeline.from_pretrained(tiny_model, device="cpu", mixed_precision="no")


def _live(tiny_model, mixed_precision="no"):
    """The tiny model with its zero-initialised output layers randomised, so the text (and any
    attention edit) visibly changes the image; 4 training steps leave them nearly zero."""
    live = Pipeline.from_pretrained(tiny_model, device="cpu", mixed_precision=mixed_precision)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in live.unet.parameters():
            if parameter.abs().max() < 1e-2:
                parameter.copy_(torch.randn(parameter.shape, generator=g) * 0.2)
    return live


@pytest.fixture(scope="module")
def live_pipe(tiny_model):
    return _live(tiny_model)


def probabilities(B=2, heads=2, h=4, w=4, T=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, heads, h * w, T, generator=g).softmax(-1)


def site(resolution=(4, 4), step=0, num_steps=10, conditional=slice(None)):
    return AttentionSite("down.1.attn.0", resolution, step, num_steps, conditional)


# ---- hand-made examples -----------------------------------------------------------------------


def test_reweighting_equals_p_times_w_renormalised_then_v():
    torch.manual_seed(0)
    layer = CrossAttention(channels=8, context_dim=6, heads=2, name="x").eval()
    x, context = torch.randn(1, 4, 8), torch.randn(1, 5, 6)
    weights = torch.tensor([[1.0, 2.0, 0.0, 0.5, 1.0]])
    out = layer(x, context, None, (2, 2), AttentionCall(AttentionReweighter(weights)))
    # by hand: P = softmax(q k^T / sqrt(d)), then P * w divided by its sum over the tokens, times V
    # per head, then the output projection
    q = layer.to_q(x).view(1, 4, 2, 4).transpose(1, 2)
    k = layer.to_k(context).view(1, 5, 2, 4).transpose(1, 2)
    v = layer.to_v(context).view(1, 5, 2, 4).transpose(1, 2)
    p = (q @ k.transpose(-1, -2) / 2.0).softmax(-1)
    weighted = p * weights[:, None, None, :]
    expected = layer.to_out(((weighted / weighted.sum(-1, keepdim=True)) @ v).transpose(1, 2).reshape(1, 4, 8))
    torch.testing.assert_close(out, expected)


def test_weight_zero_is_the_token_masked_out():
    torch.manual_seed(0)
    layer = CrossAttention(channels=8, context_dim=6, heads=2, name="x").eval()
    x, context = torch.randn(1, 4, 8), torch.randn(1, 5, 6)
    reweighted = layer(x, context, None, (2, 2), AttentionCall(AttentionReweighter(torch.tensor([[1.0, 1, 0, 1, 1]]))))
    masked = layer(x, context, torch.tensor([[True, True, False, True, True]]), (2, 2))
    torch.testing.assert_close(reweighted, masked)


def test_reweighting_touches_only_the_conditional_rows():
    p = probabilities(B=4)
    weights = torch.zeros(2, 6)
    weights[:, 1] = 3.0  # every pixel of the conditional rows then reads token 1 alone
    edited = AttentionReweighter(weights).process(site(conditional=slice(2, 4)), p)
    assert torch.equal(edited[:2], p[:2])
    assert (
        torch.allclose(edited[2:, :, :, 1], torch.ones(()))
        and torch.count_nonzero(edited[2:, :, :, [0, 2, 3, 4, 5]]) == 0
    )


def test_recorder_maps_sum_to_one_over_tokens_at_every_position():
    recorder = AttentionRecorder(size=8)
    recorder.process(site((4, 4)), probabilities(h=4, w=4))
    recorder.process(site((2, 2)), probabilities(h=2, w=2, seed=1))
    maps = recorder.token_maps()  # (B, T, 8, 8)
    assert maps.shape == (2, 6, 8, 8)
    torch.testing.assert_close(maps.sum(1), torch.ones(2, 8, 8))


def test_recorder_equals_upsampling_every_call_and_summing():
    recorder = AttentionRecorder(size=8, keep_history=True)
    expected_total, expected_history = torch.zeros(2, 6, 8, 8), {0: torch.zeros(2, 6, 8, 8), 1: torch.zeros(2, 6, 8, 8)}
    for k, (step, side) in enumerate([(0, 4), (0, 2), (0, 8), (1, 4), (1, 2), (1, 4)]):
        p = probabilities(h=side, w=side, seed=k)
        recorder.process(site((side, side), step=step), p)
        maps = p.mean(1).transpose(1, 2).reshape(2, 6, side, side)
        up = torch.nn.functional.interpolate(maps, size=(8, 8), mode="bilinear", align_corners=False)
        expected_total += up
        expected_history[step] += up
        # read between calls too: a read must not stop later calls from counting
        torch.testing.assert_close(recorder.total, expected_total)
    assert recorder.calls == 6 and sorted(recorder.history) == [0, 1]
    for step, maps in expected_history.items():
        torch.testing.assert_close(recorder.history[step], maps)
    torch.testing.assert_close(recorder.token_maps(), expected_total / 6)


def test_recorder_memory_does_not_grow_with_steps():
    recorder = AttentionRecorder(size=4)
    for step in range(50):
        recorder.process(site(step=step, num_steps=50), probabilities())
    assert recorder.total.shape == (2, 6, 4, 4) and recorder.history == {}


def test_recorder_window_and_resolutions():
    recorder = AttentionRecorder(size=4, steps=(0.0, 0.5), resolutions={4})
    assert recorder.wants(site((4, 4), step=4, num_steps=10))
    assert not recorder.wants(site((4, 4), step=5, num_steps=10))
    assert not recorder.wants(site((2, 2), step=0, num_steps=10))


def test_step_filter_covers_every_step_of_a_full_window():
    every = SiteFilter((0.0, 1.0))
    assert all(every(site(step=s, num_steps=7)) for s in range(7))


def test_injector_copies_mapped_tokens_and_keeps_new_ones():
    p = probabilities(B=2)  # rows: source, edit
    mapping = torch.tensor([[0, 1, 2, -1, 3, 4]])
    edited = AttentionInjector(mapping, fraction=1.0).process(site(), p)
    assert torch.equal(edited[0], p[0])
    for j, m in enumerate(mapping[0].tolist()):
        assert torch.equal(edited[1, :, :, j], p[0, :, :, m] if m >= 0 else p[1, :, :, j])


def test_injector_keeps_the_kept_tokens_after_its_fraction_and_frees_the_others():
    p = probabilities(B=2)
    mapping = torch.tensor([[0, 1, 2, -1, 3, 4]])
    keep = torch.tensor([[True, True, False, True, True, False]])
    injector = AttentionInjector(mapping, fraction=0.5, keep=keep)
    early = injector.process(site(step=4, num_steps=10), p)
    assert torch.equal(early, AttentionInjector(mapping, fraction=1.0).process(site(), p))  # every mapped token
    assert injector.wants(site(step=9, num_steps=10))
    late = injector.process(site(step=5, num_steps=10), p)
    for j, m in enumerate(mapping[0].tolist()):
        kept = m >= 0 and bool(keep[0, j])
        assert torch.equal(late[1, :, :, j], p[0, :, :, m] if kept else p[1, :, :, j]), j
    assert torch.equal(late[0], p[0])
    # without kept tokens, nothing is injected after the fraction; with fraction 0 only kept ones
    assert not AttentionInjector(mapping, 0.5, keep=torch.zeros_like(keep)).wants(site(step=5, num_steps=10))
    assert torch.equal(AttentionInjector(mapping, 0.0, keep=keep).process(site(step=0, num_steps=10), p), late)


def test_chain_applies_edits_before_recording():
    recorder = AttentionRecorder(size=4)
    chain = ControllerChain([AttentionReweighter(torch.zeros(2, 6)), recorder])
    chain.process(site(), probabilities())
    assert torch.count_nonzero(recorder.token_maps()) == 0


def test_merge_word_maps_sums_sub_word_tokens_and_separates_repeats():
    prompt = "a red circle and a red zebra"
    words = split_words(prompt)
    # offsets by hand: start token, one token per word except "zebra" in two pieces, end, pad
    spans = [(0, 0)] + [(w.start, w.end) for w in words[:-1]] + [(23, 25), (25, 28), (0, 0), (0, 0)]
    T = len(spans)
    maps = torch.arange(T, dtype=torch.float32)[:, None, None].expand(T, 2, 2)
    merged = merge_word_maps(maps, prompt, torch.tensor(spans))
    assert list(merged) == ["a", "red", "circle", "and", "a#2", "red#2", "zebra"]
    assert merged["red"][0, 0] == 2 and merged["red#2"][0, 0] == 6
    assert merged["zebra"][0, 0] == 7 + 8  # both pieces


# ---- which tokens a word swap changes, and the local blend -------------------------------------

T = 16
CAPTIONS = [
    f"a {colour} {shape} on the {side}"
    for colour in ("red", "green", "blue", "yellow")
    for shape in ("circle", "square", "triangle")
    for side in ("left", "right")
]


@pytest.fixture(scope="module")
def tokenizer():
    return fit_tokenizer(CAPTIONS * 4, vocab_size=600, model_max_length=T)


def swap_tokens(tokenizer, pairs):
    """changed_tokens of (source, edit) `pairs` tokenized as TextEncoder.tokenize does, with each
    prompt's token texts: (2P, T) bool, [[token text, ...] per prompt]."""
    texts = [text for pair in pairs for text in pair]
    tokens = tokenizer(
        texts, return_offsets_mapping=True, padding="max_length", truncation=True, max_length=T, return_tensors="pt"
    )
    ids, offsets = tokens["input_ids"], tokens["offset_mapping"]
    mapping = torch.stack(
        [align_tokens(offsets[2 * k], texts[2 * k], offsets[2 * k + 1], texts[2 * k + 1], T) for k in range(len(pairs))]
    )
    pieces = [[text[a:b] for a, b in o.tolist()] for text, o in zip(texts, offsets)]
    return changed_tokens(ids, offsets, mapping), pieces


def marked(changed, pieces, row):
    return [pieces[row][j] for j in changed[row].nonzero()[:, 0].tolist()]


def test_a_colour_swap_changes_the_colour_token_in_both_prompts(tokenizer):
    changed, pieces = swap_tokens(tokenizer, [("a red circle on the left", "a blue circle on the left")])
    assert changed.shape == (2, T) and changed.dtype == torch.bool
    assert marked(changed, pieces, 0) == ["red"] and marked(changed, pieces, 1) == ["blue"]


def test_an_added_word_changes_only_the_edits_tokens(tokenizer):
    changed, pieces = swap_tokens(tokenizer, [("a red circle", "a big red circle")])
    assert "".join(marked(changed, pieces, 1)) == "big"  # every piece of the unseen word
    assert len(marked(changed, pieces, 1)) == len(tokenizer.tokenize("big")) > 1
    assert not changed[0].any()


def test_changed_tokens_of_several_pairs_and_of_an_unchanged_pair(tokenizer):
    changed, pieces = swap_tokens(
        tokenizer,
        [
            ("a red circle on the left", "a red circle on the left"),
            ("a red circle", "a zebra circle"),
            ("a green square on the left", "a green triangle on the right"),
        ],
    )
    assert not changed[:2].any()  # the same prompt twice changes nothing
    assert marked(changed, pieces, 2) == ["red"] and "".join(marked(changed, pieces, 3)) == "zebra"
    assert marked(changed, pieces, 4) == ["square", "left"] and marked(changed, pieces, 5) == ["triangle", "right"]


def offsets_of(tokenizer, *texts):
    tokens = tokenizer(list(texts), return_offsets_mapping=True, padding="max_length", truncation=True, max_length=T)
    return tokens["offset_mapping"]


@pytest.mark.parametrize(
    "source, edit, expected",
    [
        ("a red circle on the left", "a blue circle on the left", "recolour"),
        ("an orange circle", "a red circle", "recolour"),  # the article changes with the colour
        ("a Red circle on the left", "a GREEN circle on the left", "recolour"),
        ("a red circle and a red square", "a red circle and a blue square", "recolour"),
        ("a small red circle", "a large red circle", "resize"),
        ("a red circle and a big square", "a red circle and a tiny square", "resize"),
        ("a small red circle", "a large blue circle", None),  # size and colour
        ("a red circle", "a red square", None),
        ("a red circle", "a blue square", None),
        ("a red circle on the left", "a blue circle on the right", None),
        ("a circle", "a red circle", None),  # adding a colour is a refinement
        ("a red circle", "a circle", None),
        ("a circle", "a small circle", None),
        ("a red circle", "a red circle", None),  # nothing changes
    ],
)
def test_swap_kind_names_recolourings_and_resizings(tokenizer, source, edit, expected):
    changed, _ = swap_tokens(tokenizer, [(source, edit)])
    spans = offsets_of(tokenizer, source, edit)
    assert swap_kind(source, spans[0], changed[0], edit, spans[1], changed[1]) == expected


@pytest.mark.parametrize(
    "source, edit, phrase",
    [
        ("a small red circle on the left", "a large red circle on the left", "large red circle"),
        ("left, a big circle", "left, a tiny circle", "tiny circle"),
        ("a small circle, a red square", "a large circle, a red square", "large circle"),  # the comma ends it
        ("a red square and a small circle", "a red square and a large circle", "large circle"),
        ("a red circle", "a red circle", ""),  # nothing changed
    ],
)
def test_object_phrase_runs_from_the_changed_word_to_the_end_of_its_noun_phrase(tokenizer, source, edit, phrase):
    changed, pieces = swap_tokens(tokenizer, [(source, edit)])
    inside = object_phrase(edit, offsets_of(tokenizer, edit)[0], changed[1])
    assert len(inside) == T
    assert "".join(p for p, flag in zip(pieces[1], inside) if flag) == phrase.replace(" ", "")


def blend_with_maps(changed, maps, threshold=0.3):
    """A LocalBlend whose recorder holds `maps` (2P, T, S, S) as its running sum."""
    blend = LocalBlend(changed, size=maps.shape[-1], threshold=threshold)
    B, T, S, _ = maps.shape
    one_head = maps.flatten(2).transpose(1, 2)[:, None]  # (B, 1, S*S, T): its mean over heads is `maps`
    blend.process(site((S, S)), one_head)
    return blend


def test_local_blend_region_is_the_dilated_changed_maps_of_source_and_edit():
    maps = torch.zeros(2, 3, 6, 6)  # one pair, 3 tokens, 6 x 6
    maps[:, 0] = 5.0  # an unchanged token attends everywhere, strongly: not part of the region
    maps[0, 1, 1, 1] = 1.0  # the source's changed token: one strong pixel ...
    maps[0, 1, 4, 0] = 0.25  # ... and a weak one, below 0.3 of its maximum
    maps[1, 2, 4, 4] = 2.0  # the edit's changed token (a larger maximum, normalised on its own)
    maps[1, 2, 0, 5] = 0.8  # 0.4 of the maximum: above the threshold
    changed = torch.tensor([[False, True, False], [False, False, True]])
    region = blend_with_maps(changed, maps).region()
    expected = torch.zeros(1, 6, 6, dtype=torch.bool)
    expected[0, 0:3, 0:3] = True  # 3 x 3 around (1, 1)
    expected[0, 3:6, 3:6] = True  # around (4, 4), cut at the border
    expected[0, 0:2, 4:6] = True  # around (0, 5)
    assert torch.equal(region, expected)
    assert not blend_with_maps(changed, maps, threshold=0.5).region()[0, 0, 5]  # 0.4 < 0.5


def test_local_blend_keeps_the_source_outside_the_region_and_the_edit_inside():
    maps = torch.zeros(4, 2, 4, 4)  # two pairs: rows source 0, edit 0, source 1, edit 1
    maps[1, 1, 0, 0] = 1.0  # pair 0: the edit's changed token at the top left
    maps[2, 1, 3, 3] = 1.0  # pair 1: the source's changed token at the bottom right
    changed = torch.tensor([[False, False], [False, True], [False, True], [False, False]])
    blend = blend_with_maps(changed, maps)
    region = blend.region()  # (2, 4, 4)
    x = torch.stack([torch.full((3, 4, 4), float(k)) for k in range(4)])  # image k filled with k
    given = x.clone()
    out = blend(None, 5, 100, {"latents": x, "other": "kept"})
    assert torch.equal(x, given)  # the input is not changed in place
    assert out["other"] == "kept"
    assert torch.equal(out["latents"][0::2], x[0::2])  # sources untouched
    for k in range(2):
        edit = out["latents"][2 * k + 1]
        inside = region[k].expand(3, 4, 4)
        assert torch.equal(edit[inside], x[2 * k + 1][inside])
        assert torch.equal(edit[~inside], x[2 * k][~inside])
        assert inside.any() and (~inside).any()


def test_local_blend_before_any_recording_changes_nothing():
    blend = LocalBlend(torch.ones(2, 3, dtype=torch.bool), size=4)
    x = torch.randn(2, 3, 4, 4)
    out = blend(None, 0, 999, {"latents": x})
    assert torch.equal(out["latents"], x)


def test_local_blend_records_only_what_its_recorder_wants():
    blend = LocalBlend(torch.ones(2, 6, dtype=torch.bool), size=4, resolutions={2})
    assert not blend.wants(site((4, 4))) and blend.wants(site((2, 2)))
    assert blend.process(site((2, 2)), probabilities(h=2, w=2)) is None  # reads, never edits
    assert blend.recorder.total.shape == (2, 6, 4, 4)


# ---- through the pipeline -------------------------------------------------------------------


def test_pipeline_maps_are_per_word_and_hold_the_word_tokens_mass(pipe):
    out = pipe(["a red circle and a red square"], steps=3, attention_maps=True, progress=False)
    maps = out.attention_maps[0]
    assert list(maps) == ["a", "red", "circle", "and", "a#2", "red#2", "square"]
    size = pipe.unet.config.sample_size
    assert all(m.shape == (size, size) for m in maps.values())
    # per position, the words hold at most all of the attention (the start token holds the rest)
    assert float(torch.stack(list(maps.values())).sum(0).max()) <= 1 + 1e-5


@pytest.mark.parametrize("mixed_precision", ["no", "bf16"])
def test_recording_maps_does_not_change_the_image(tiny_model, mixed_precision):
    # In bf16 the explicit softmax the recorder needs rounds differently from the fused kernel;
    # a controller that only reads must leave the output to the kernel the plain sample uses.
    pipe = _live(tiny_model, mixed_precision)
    prompts, seeds = ["a red circle on the left", "a blue square"], [0, 1]
    for sampler in ("euler", "dpm++", "ddpm"):
        plain = pipe.denoise(prompts, seeds, steps=3, sampler=sampler)
        recorder = AttentionRecorder(pipe.unet.config.sample_size)
        recorded = pipe.denoise(prompts, seeds, steps=3, sampler=sampler, attention_controller=recorder)
        assert torch.equal(plain, recorded)
        assert recorder.token_maps().abs().sum() > 0  # the maps were recorded


def test_weight_one_is_bit_identical(pipe):
    plain = pipe("a red circle on the left", steps=3, progress=False).images[0]
    weighted = pipe("a (red:1) circle on the left", steps=3, progress=False).images[0]
    assert np.array_equal(np.asarray(plain), np.asarray(weighted))


@pytest.mark.parametrize("mode", ["attention", "embedding"])
def test_weights_change_the_image(live_pipe, mode):
    pipe = live_pipe
    plain = pipe("a red circle on the left", steps=3, progress=False).images[0]
    weighted = pipe("a (red:0) circle on the left", steps=3, progress=False, weighting=Weighting(mode)).images[0]
    assert not np.array_equal(np.asarray(plain), np.asarray(weighted))


def test_embedding_weight_zero_removes_the_word(live_pipe):
    # At weight 0 the word is neither a key nor in the other tokens' context, so which colour it
    # named no longer matters; at weight 0.5 it still does.
    zero = Weighting("embedding")
    deleted = np.asarray(live_pipe("a circle on the left", steps=3, progress=False).images[0], np.int16)
    for prompt in ("a (red:0) circle on the left", "a (red:0) circle (on the left:0)"):
        weighted = live_pipe(prompt, steps=3, progress=False, weighting=zero).images[0]
        if "left:0" in prompt:  # two words at 0: the prompt without either
            deleted = np.asarray(live_pipe("a circle", steps=3, progress=False).images[0], np.int16)
        assert np.abs(np.asarray(weighted, np.int16) - deleted).max() <= 1, prompt
    red, blue = (
        live_pipe(f"a ({c}:0) circle on the left", steps=3, progress=False, weighting=zero).images[0]
        for c in ("red", "blue")
    )
    assert np.array_equal(np.asarray(red), np.asarray(blue))
    red, blue = (
        live_pipe(f"a ({c}:0.5) circle on the left", steps=3, progress=False, weighting=zero).images[0]
        for c in ("red", "blue")
    )
    assert not np.array_equal(np.asarray(red), np.asarray(blue))


def _token_index(pipe, text: str, word: str) -> int:
    """Index of the first token of `word` in `text`."""
    start = text.index(word)
    return int((pipe.encoder.offsets([text])[0, :, 0] == start).nonzero()[0, 0])


@pytest.mark.parametrize("mode", ["attention", "embedding"])
def test_fading_context_moves_the_later_tokens_to_the_prompt_without_the_word(pipe, mode):
    # "red" is written into the states of the tokens after it by the causal CLIP; fading moves
    # those states to the encoding of the prompt with "red" deleted, by the weight.
    text, deleted = "a red circle on the left", "a circle on the left"
    red, circle, left = (_token_index(pipe, text, w) for w in ("red", "circle", "left"))
    full, _ = pipe.encoder.encode([text])
    without, _ = pipe.encoder.encode([deleted])
    without_circle, without_left = (_token_index(pipe, deleted, w) for w in ("circle", "left"))
    for weight in (0.0, 0.5):
        weights = torch.ones(1, full.shape[1])
        weights[0, red] = weight
        faded, _ = condition(pipe.encoder, [text], weights, Weighting(mode))
        kept, _ = condition(pipe.encoder, [text], weights, Weighting(mode, context="keep"))
        for k, k_without in ((circle, without_circle), (left, without_left)):
            expected = without[0, k_without] + weight * (full[0, k] - without[0, k_without])
            assert torch.allclose(faded[0, k], expected, atol=1e-5)  # embedding mode: e0 + 1 (e - e0) at weight 1
            assert torch.allclose(kept[0, k], full[0, k], atol=1e-5)  # keep: as encoded
        assert torch.allclose(faded[0, :red], full[0, :red], atol=1e-5)  # the tokens before it cannot hold it
    assert not torch.allclose(full[0, circle], without[0, without_circle], atol=1e-3)  # the test can fail


def test_attention_mode_fades_the_context_only_below_weight_one(live_pipe):
    weighting, keep = Weighting("attention"), Weighting("attention", context="keep")
    for prompt, differ in (("a (red:2) circle on the left", False), ("a (red:0) circle on the left", True)):
        faded = live_pipe(prompt, steps=3, progress=False, weighting=weighting).images[0]
        kept = live_pipe(prompt, steps=3, progress=False, weighting=keep).images[0]
        assert np.array_equal(np.asarray(faded), np.asarray(kept)) != differ, prompt


def test_attention_weights_and_their_fading_act_only_within_the_window(live_pipe):
    # 3 steps sit at fractions 0, 1/3, 2/3: a window of [0.9, 1) holds none, so nothing changes
    plain = live_pipe("a red circle on the left", steps=3, progress=False).images[0]
    for window, changed in (((0.9, 1.0), False), ((0.0, 0.5), True)):
        weighted = live_pipe(
            "a (red:0) circle on the left", steps=3, progress=False, weighting=Weighting("attention", steps=window)
        ).images[0]
        assert np.array_equal(np.asarray(plain), np.asarray(weighted)) != changed, window


def test_each_mode_has_its_default_window_and_steps_override_it():
    assert Weighting("attention").window == DEFAULT_WEIGHT_STEPS["attention"] == (0.0, 1.0)
    assert Weighting("embedding").window == DEFAULT_WEIGHT_STEPS["embedding"] != (0.0, 1.0)
    assert Weighting("embedding", steps=(0.0, 1.0)).window == (0.0, 1.0)
    with pytest.raises(UserError, match="weight steps must be a window"):
        Weighting("embedding", steps=(0.5, 0.5)).check()


def test_embedding_weights_act_within_the_window_but_a_word_at_zero_stays_deleted(live_pipe):
    # 3 steps sit at fractions 0, 1/3, 2/3: a window of [0.9, 1) holds none of them
    def image(prompt, **weighting):
        return np.asarray(
            live_pipe(prompt, steps=3, progress=False, weighting=Weighting("embedding", **weighting)).images[0]
        )

    plain = image("a red circle on the left")
    assert np.array_equal(image("a (red:2) circle on the left", steps=(0.9, 1.0)), plain)
    assert not np.array_equal(image("a (red:2) circle on the left"), plain)  # the default window holds step 0
    deleted = image("a circle on the left")
    for window in ((0.9, 1.0), None):
        zero = image("a (red:0) circle on the left", steps=window)
        assert np.abs(zero.astype(int) - deleted.astype(int)).max() <= 1, window


def test_swap_with_the_same_prompt_keeps_the_source_image(pipe):
    source, edit = pipe.swap(
        "a red circle on the left", "a red circle on the left", num_images=2, steps=3, progress=False
    )
    for a, b in zip(source.images, edit.images):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_swap_source_is_the_plain_sample(pipe):
    source, _ = pipe.swap("a red circle on the left", "a blue circle on the left", seed=3, steps=3, progress=False)
    plain = pipe("a red circle on the left", seed=3, steps=3, progress=False).images[0]
    assert np.array_equal(np.asarray(source.images[0]), np.asarray(plain))


def test_swap_injection_changes_the_edit(live_pipe):
    _, injected = live_pipe.swap("a red circle on the left", "a blue square on the right", steps=3, progress=False)
    _, free = live_pipe.swap(
        "a red circle on the left", "a blue square on the right", steps=3, edit_steps=0.0, progress=False
    )
    assert not np.array_equal(np.asarray(injected.images[0]), np.asarray(free.images[0]))


def test_keeping_the_layout_changes_a_shape_swap_and_auto_keeps_it_for_colours_only(live_pipe):
    def edit(source, target, keep_layout):
        _, out = live_pipe.swap(source, target, steps=4, edit_steps=0.25, keep_layout=keep_layout, progress=False)
        return np.asarray(out.images[0]), out.settings["keep_layout"]

    shape = ("a red circle on the left", "a red square on the left")
    free, free_setting = edit(*shape, None)
    kept, kept_setting = edit(*shape, True)
    assert free_setting == "off" and kept_setting == "on" and not np.array_equal(free, kept)
    assert np.array_equal(free, edit(*shape, False)[0])
    colour = ("a red circle on the left", "a blue circle on the left")
    auto, auto_setting = edit(*colour, None)
    assert auto_setting == "on" and np.array_equal(auto, edit(*colour, True)[0])
    assert not np.array_equal(auto, edit(*colour, False)[0])
    size = ("a small red circle on the left", "a large red circle on the left")
    redrawn, redrawn_setting = edit(*size, None)
    assert redrawn_setting == "redraw object"
    assert not np.array_equal(redrawn, edit(*size, True)[0]) and not np.array_equal(redrawn, edit(*size, False)[0])


def test_local_blend_keeps_the_source_outside_the_changed_words(monkeypatch):
    """Through the pipeline, on the small model that draws shapes (its colour words attend to the
    object): after the last step the edit equals the source wherever the last blend region is
    off, and differs from it inside."""
    import diffusion.sampling.pipeline

    small = Pipeline.from_pretrained(
        Path(__file__).parent / "assets" / "small-shapes", device="cpu", mixed_precision="no"
    )
    blends = []

    class Watched(LocalBlend):
        def __call__(self, pipeline, step, timestep, tensors):
            blends.append(self)
            self.last_region = self.region().clone()
            return super().__call__(pipeline, step, timestep, tensors)

    monkeypatch.setattr(diffusion.sampling.pipeline, "LocalBlend", Watched)
    settings = SamplingSettings(steps=5, guidance=3.0, sampler="euler", edit_steps=0.6)
    plan = small.swap_plan([("a red circle on the left", "a blue circle on the left")])
    x, _ = small.swap_batch(plan, [2], settings.but(local_blend=True))
    free, _ = small.swap_batch(plan, [2], settings)
    assert len(blends) == 5 and len(set(map(id, blends))) == 1  # one blend, called after every step
    keep = blends[0].last_region[0].expand(3, -1, -1)  # (3, R, R)
    assert keep.any() and not keep.all()
    assert torch.equal(x[0], free[0])  # the source is drawn as without the blend
    assert torch.equal(x[1][~keep], x[0][~keep])
    assert (x[1][keep] - x[0][keep]).abs().max() > 1e-2
    assert (free[1][~keep] - free[0][~keep]).abs().max() > 1e-3  # without the blend the outside changes too


def test_map_options_limit_the_recorded_layers(pipe):
    out = pipe("a red circle", steps=2, attention_maps=MapOptions(resolutions={8}), progress=False)
    assert "red" in out.attention_maps[0]


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"weighting": Weighting("loud")}, "weight mode"),
        ({"weighting": Weighting(steps=(0.5, 0.2))}, "weight steps"),
        ({"weighting": Weighting(context="forget")}, "weight context"),
    ],
)
def test_bad_weighting_is_a_user_error(pipe, kwargs, fragment):
    from diffusion.errors import UserError

    with pytest.raises(UserError, match=fragment):
        pipe("a red circle", steps=2, progress=False, **kwargs)


def test_malformed_prompt_is_a_user_error_with_a_caret(pipe):
    from diffusion.control.prompts import PromptSyntaxError

    with pytest.raises(PromptSyntaxError) as error:
        pipe("a (red:abc) circle", steps=2, progress=False)
    assert "^" in str(error.value)


def test_each_controller_says_what_it_needs_from_a_compiled_unet_call():
    weights = torch.tensor([[1.0, 0.5, 2.0]])
    recorder = AttentionRecorder(16)
    assert recorder.graph_request(0, 4) == GraphRequest(recorders=(recorder,))
    early = AttentionReweighter(weights, steps=(0.0, 0.5), resolutions={8})
    request = early.graph_request(1, 4)
    assert request.weights is weights and request.resolutions == frozenset({8}) and not request.record
    assert early.graph_request(2, 4) == GraphRequest()  # outside its window: nothing to apply
    assert AttentionReweighter(weights).graph_request(None, None).resolutions is None  # outside sampling: in
    mapping = torch.tensor([[0, 1, 2]])
    for eager_only in (AttentionController(), AttentionInjector(mapping, 0.5), LocalBlend(mapping > 0, 16)):
        assert eager_only.graph_request(0, 4) is None

    class Heads(AttentionRecorder):  # reads the heads itself: the graph's mean over heads would not do
        def process(self, site, probabilities):
            return None

    assert Heads(16).graph_request(0, 4) is None


def test_a_chain_merges_its_members_requests():
    weights = torch.tensor([[1.0, 0.5]])
    first, second = AttentionRecorder(16), AttentionRecorder(8)
    chain = ControllerChain([AttentionReweighter(weights), first, second])
    request = chain.graph_request(0, 4)
    assert request.weights is weights and request.recorders == (first, second)
    assert ControllerChain([]).graph_request(0, 4) == GraphRequest()
    assert ControllerChain([first, AttentionInjector(torch.tensor([[0, 1]]), 0.5)]).graph_request(0, 4) is None
    two = ControllerChain([AttentionReweighter(weights), AttentionReweighter(weights)])
    assert two.graph_request(0, 4) is None  # the graph applies one set of weights
    window = ControllerChain([AttentionReweighter(weights, steps=(0.5, 1.0)), AttentionReweighter(weights)])
    assert window.graph_request(0, 4).weights is weights  # the other is outside its window
