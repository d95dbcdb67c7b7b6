"""Tests for diffusion/model/text_encoder.py, with tiny models built locally (the hub is unreachable)."""

import types

import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer, CLIPVisionConfig

from diffusion.data.text_states import EmbeddingCache
from diffusion.errors import UserError
from diffusion.model.text_encoder import TextEncoder
from diffusion.training.clip import clip_text_config, fit_tokenizer, train_clip

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}
CAPTIONS = [
    f"a {colour} {shape} on the {side}"
    for colour in COLOURS
    for shape in ("circle", "square", "triangle")
    for side in ("left", "right")
]
MAX_LENGTH = 16


@pytest.fixture(scope="module")
def tokenizer():
    return fit_tokenizer(CAPTIONS * 4, vocab_size=1024, model_max_length=MAX_LENGTH)


@pytest.fixture(scope="module")
def clip(tokenizer):
    """A tiny untrained CLIPModel whose text half matches `tokenizer`."""
    text = clip_text_config(tokenizer, 32, 2, 2, intermediate_size=64)
    vision = CLIPVisionConfig(
        image_size=8, patch_size=4, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
    )
    torch.manual_seed(0)
    return CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=16)).eval()


@pytest.fixture(scope="module")
def encoder(tokenizer, clip):
    return TextEncoder(tokenizer, clip.text_model, concat_token_embeddings=False)


def token_strings(tokenizer, text):
    return tokenizer.convert_ids_to_tokens(tokenizer(text)["input_ids"])


def test_fit_tokenizer_round_trips_and_covers_any_text(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    reloaded = CLIPTokenizer.from_pretrained(tmp_path)
    texts = CAPTIONS + ["Zebra! 42 héllo", ""]
    assert reloaded(texts)["input_ids"] == tokenizer(texts)["input_ids"]
    assert reloaded.model_max_length == MAX_LENGTH

    for word in ("red", "circle", "left"):
        assert token_strings(tokenizer, word) == ["<|startoftext|>", f"{word}</w>", "<|endoftext|>"]
    assert token_strings(tokenizer, "A  RED") == ["<|startoftext|>", "a</w>", "red</w>", "<|endoftext|>"]
    # The unknown token is <|endoftext|>: an unseen word must not produce it before the real end.
    unseen = tokenizer("zebra! ünïcode ☃")["input_ids"]
    assert tokenizer.eos_token_id not in unseen[1:-1] and len(unseen) > 6

    assert tokenizer.pad_token == tokenizer.eos_token == "<|endoftext|>"
    assert tokenizer.bos_token == "<|startoftext|>"
    offsets = tokenizer("a red  circle", return_offsets_mapping=True)["offset_mapping"]
    assert offsets == [(0, 0), (0, 1), (2, 5), (7, 13), (0, 0)]


def test_fit_tokenizer_rejects_bad_input():
    with pytest.raises(UserError, match="vocab_size"):
        fit_tokenizer(CAPTIONS, vocab_size=512)
    with pytest.raises(UserError, match="caption"):
        fit_tokenizer([])


def test_from_pretrained_loads_both_layouts(tokenizer, clip, encoder, tmp_path):
    prompts = ["a red circle on the left", "a zebra"]
    expected = encoder.encode(prompts)

    split = tmp_path / "split"
    encoder.save_pretrained(split)
    assert (split / "tokenizer").is_dir() and (split / "text_encoder" / "model.safetensors").is_file()

    # A plain CLIP checkpoint, as a hub id like openai/clip-vit-base-patch32 is laid out.
    plain = tmp_path / "plain"
    clip.save_pretrained(plain)
    tokenizer.save_pretrained(plain)

    for folder in (split, plain):
        loaded = TextEncoder.from_pretrained(folder, concat_token_embeddings=False)
        assert not loaded.model.training and not any(p.requires_grad for p in loaded.parameters())
        assert loaded.max_length == MAX_LENGTH and loaded.embedding_dim == 32
        for name, tensor in clip.text_model.state_dict().items():
            assert torch.equal(loaded.model.state_dict()[name], tensor), name
        embeddings, key_mask = loaded.encode(prompts)
        assert torch.equal(embeddings, expected[0]) and torch.equal(key_mask, expected[1])


def test_from_pretrained_errors_are_one_line_user_errors(tokenizer, clip, tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(UserError, match="no such folder") as error:
        TextEncoder.from_pretrained(missing)
    assert str(missing) in str(error.value) and "\n" not in str(error.value)

    tokenizer_only = tmp_path / "tokenizer_only"
    tokenizer.save_pretrained(tokenizer_only)
    with pytest.raises(UserError, match="tokenizer_only") as error:
        TextEncoder.from_pretrained(tokenizer_only)
    assert "\n" not in str(error.value) and error.value.__suppress_context__

    weights_only = tmp_path / "weights_only"
    clip.save_pretrained(weights_only)
    with pytest.raises(UserError, match="no CLIP tokenizer files"):
        TextEncoder.from_pretrained(weights_only)


def test_encode_shapes_and_key_mask(tokenizer, clip, encoder):
    prompts = ["a red circle", "", "a blue square on the right"]
    embeddings, key_mask = encoder.encode(prompts)
    assert embeddings.shape == (3, MAX_LENGTH, 32) and embeddings.dtype == torch.float32
    assert key_mask.shape == (3, MAX_LENGTH) and key_mask.dtype == torch.bool

    # "a red circle" is <start> a red circle <end>: the start and words kept, end and padding masked.
    assert key_mask[0].tolist() == [True] * 4 + [False] * (MAX_LENGTH - 4)
    assert key_mask[1].tolist() == [True] + [False] * (MAX_LENGTH - 1)
    assert key_mask[2].sum() == 7

    with_eos = TextEncoder(tokenizer, clip.text_model, mask_eos=False)
    assert with_eos.encode(prompts)[1][0].tolist() == [True] * 5 + [False] * (MAX_LENGTH - 5)

    tokens = encoder.tokenize(prompts)
    assert tokens["input_ids"].shape == (3, MAX_LENGTH) and tokens["input_ids"].dtype == torch.long
    assert tokens["offsets"].shape == (3, MAX_LENGTH, 2)
    assert tokens["offsets"][0, 3].tolist() == [6, 12]  # "circle"


def test_hidden_layer_selects_a_different_layer(tokenizer, clip, encoder):
    penultimate = TextEncoder(tokenizer, clip.text_model, hidden_layer=-2, concat_token_embeddings=False)
    last, _ = encoder.encode(["a red circle"])
    skipped, _ = penultimate.encode(["a red circle"])
    assert not torch.allclose(last, skipped)
    with pytest.raises(UserError, match="hidden_layer"):
        TextEncoder(tokenizer, clip.text_model, hidden_layer=-4)


def test_the_embedding_layer_carries_no_context(tokenizer, clip, encoder):
    # "circle" at the same position after "red" or "blue": the same vector only without context
    words = TextEncoder(tokenizer, clip.text_model, hidden_layer=-3, concat_token_embeddings=False)
    position = len(tokenizer("a red")["input_ids"]) - 1  # the token after "red" (its end token dropped)
    assert tokenizer("a blue circle")["input_ids"][position] == tokenizer("a red circle")["input_ids"][position]
    context_free, _ = words.encode(["a red circle", "a blue circle"])
    contextual, _ = encoder.encode(["a red circle", "a blue circle"])
    torch.testing.assert_close(context_free[0, position], context_free[1, position])
    assert not torch.allclose(contextual[0, position], contextual[1, position])
    with pytest.raises(UserError, match="max_length"):
        TextEncoder(tokenizer, clip.text_model, max_length=MAX_LENGTH + 1)


def test_truncation_warns_with_the_cut_words(tokenizer, clip, recwarn):
    short = TextEncoder(tokenizer, clip.text_model, max_length=6)
    # Exactly 6 tokens (<start> + 4 words + <end>) fills the row without cutting anything.
    short.tokenize(["a red circle on"])
    assert not recwarn.list
    with pytest.warns(UserWarning, match='prompt truncated to 6 tokens; cut: "the  left, and a blue square"'):
        tokens = short.tokenize(["a red circle on the  left, and a blue square"])
    assert tokens["input_ids"].shape == (1, 6) and tokens["input_ids"][0, -1] == tokenizer.eos_token_id
    with pytest.warns(UserWarning, match='^2 prompts truncated to 6 tokens; cut: "the left", "yellow"$'):
        short.tokenize(["a red circle on the left", "a", "a blue square on yellow"])


def test_user_errors_for_bad_prompts(encoder):
    with pytest.raises(UserError, match="list"):
        encoder.encode("a red circle")
    with pytest.raises(UserError, match="prompt 1"):
        encoder.encode(["a red circle", 3])


def test_embedding_cache_encodes_each_distinct_caption_once(encoder, monkeypatch):
    encoded = []
    encode = encoder.encode

    def counting_encode(prompts):
        encoded.extend(prompts)
        return encode(prompts)

    monkeypatch.setattr(encoder, "encode", counting_encode)
    cache = EmbeddingCache(encoder, batch_size=2)  # small batches: several chunks and regrowth
    batch = ["a red circle", "a blue square", "a red circle", ""]
    embeddings, key_mask = cache.get(batch)
    expected_embeddings, expected_mask = encode(batch)
    assert torch.allclose(embeddings, expected_embeddings, atol=1e-6) and torch.equal(key_mask, expected_mask)

    cache.precompute(CAPTIONS + batch, progress=False)
    embeddings, key_mask = cache.get(list(reversed(CAPTIONS)) + batch)
    assert torch.allclose(embeddings[-4:], expected_embeddings, atol=1e-6)
    assert torch.allclose(embeddings[:2], encode(list(reversed(CAPTIONS))[:2])[0], atol=1e-6)
    assert sorted(encoded) == sorted(set(CAPTIONS + batch)) and len(cache) == len(encoded)


def test_remember_keeps_the_last_calls_bit_for_bit_and_no_more(tokenizer, clip, encoder, monkeypatch):
    remembering = TextEncoder(tokenizer, clip.text_model, concat_token_embeddings=False)
    remembering.remember(2)
    calls = []
    compute = remembering._encode
    monkeypatch.setattr(remembering, "_encode", lambda prompts: calls.append(list(prompts)) or compute(prompts))
    batches = [["a red circle", ""], ["a blue square"], ["a red circle", ""], ["x"], ["a blue square"]]
    for prompts in batches:
        embeddings, key_mask = remembering.encode(prompts)
        expected = encoder.encode(prompts)  # the same weights, nothing remembered
        assert torch.equal(embeddings, expected[0]) and torch.equal(key_mask, expected[1])
        assert len(remembering._remembered) <= 2
    # the third call was remembered; "x" then pushed out the least recently used, the blue square
    assert calls == [["a red circle", ""], ["a blue square"], ["x"], ["a blue square"]]
    remembering.encode(["a red circle", ""])[0].zero_()  # a caller writing into its copy
    assert torch.equal(remembering.encode(["a red circle", ""])[0], encoder.encode(["a red circle", ""])[0])
    remembering.remember(0)  # off again: everything goes, every call computes
    assert len(remembering._remembered) == 0
    remembering.encode(["x"])
    assert calls[-1] == ["x"] and len(remembering._remembered) == 0
    assert encoder._remembered.size == 0  # off unless asked for


def flat_colour_images(per_colour, generator):
    """Flat colour 8x8 images with a little noise, and captions naming the colour."""
    names = [name for name in COLOURS for _ in range(per_colour)]
    rgb = torch.tensor([COLOURS[name] for name in names], dtype=torch.float32)  # (N, 3)
    images = rgb[:, :, None, None] + 20 * torch.randn(len(names), 3, 8, 8, generator=generator)
    return images.clamp(0, 255).to(torch.uint8), [f"a {name} picture" for name in names]


def test_train_clip_saves_a_loadable_encoder_that_retrieves(tmp_path):
    generator = torch.Generator().manual_seed(0)
    images, captions = flat_colour_images(16, generator)
    tokenizer = fit_tokenizer(captions, model_max_length=8)
    config = types.SimpleNamespace(
        width=32, layers=2, steps=40, batch_size=32, lr=3e-3, vocab_size=1024, max_length=8, seed=0
    )
    clip = train_clip(images, captions, tokenizer, config, tmp_path, progress=False)

    loaded = TextEncoder.from_pretrained(tmp_path, concat_token_embeddings=False)
    assert loaded.embedding_dim == 32 and loaded.max_length == 8
    for name, tensor in clip.text_model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], tensor.cpu()), name

    # Zero-shot text -> image retrieval on fresh images: one per colour, chance is 1/4.
    test_images, _ = flat_colour_images(1, generator)
    prompts = [f"a {name} picture" for name in COLOURS]
    with torch.no_grad():
        tokens = tokenizer(prompts, padding=True, return_tensors="pt")
        text = F.normalize(clip.get_text_features(**tokens).pooler_output, dim=-1)
        pixels = test_images.float() / 127.5 - 1
        image = F.normalize(clip.get_image_features(pixel_values=pixels).pooler_output, dim=-1)
    accuracy = ((text @ image.T).argmax(1) == torch.arange(len(COLOURS))).float().mean()
    assert accuracy > 0.5


def test_train_clip_rejects_bad_images(tokenizer, tmp_path):
    config = types.SimpleNamespace(width=32, layers=1, steps=1, batch_size=2, lr=1e-3, seed=0)
    with pytest.raises(UserError, match="uint8"):
        train_clip(torch.zeros(2, 3, 8, 8), ["a", "b"], tokenizer, config, tmp_path)
    with pytest.raises(UserError, match="one caption"):
        train_clip(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), ["a"], tokenizer, config, tmp_path)


def test_concatenated_token_embeddings_carry_both_the_word_and_its_context(tokenizer, clip, encoder):
    both = TextEncoder(tokenizer, clip.text_model, concat_token_embeddings=True)
    words = TextEncoder(tokenizer, clip.text_model, hidden_layer=-3, concat_token_embeddings=False)
    assert both.embedding_dim == 2 * encoder.embedding_dim
    prompts = ["a red circle on the left", "a blue square"]
    joined, mask = both.encode(prompts)
    contextual, contextual_mask = encoder.encode(prompts)
    own, _ = words.encode(prompts)
    D = encoder.embedding_dim
    torch.testing.assert_close(joined[..., :D], contextual)
    torch.testing.assert_close(joined[..., D:], own)
    assert torch.equal(mask, contextual_mask)
