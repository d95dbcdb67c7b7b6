"""Tests for diffusion/data/text_states.py: the on-disk text states of a caption list."""

import copy
import errno
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import CLIPTextModel

from diffusion.data import text_states as embedding_store
from diffusion.data.text_states import EmbeddingCache, EmbeddingStore, cache_folder, cache_key
from diffusion.errors import UserError
from diffusion.model.text_encoder import TextEncoder
from diffusion.training.clip import clip_text_config, fit_tokenizer

CAPTIONS = [
    "",
    "a blue square",
    "a red circle on the left",
    "a small green cross at the top",
    "a yellow triangle below a purple circle",
    "two red squares",
]
MAX_LENGTH = 16


@pytest.fixture(scope="module")
def tokenizer():
    return fit_tokenizer(CAPTIONS * 4, vocab_size=600, model_max_length=MAX_LENGTH)


def tiny_encoder(tokenizer, **options) -> TextEncoder:
    """A tiny untrained CLIP text encoder (the same weights every call)."""
    torch.manual_seed(0)
    config = clip_text_config(tokenizer, 16, 2, 2, intermediate_size=32)
    return TextEncoder(tokenizer, CLIPTextModel(config), **{"concat_token_embeddings": True, **options})


@pytest.fixture
def encoder(tokenizer):
    return tiny_encoder(tokenizer)


def count_encodes(encoder, monkeypatch) -> list[int]:
    """Make `encoder.encode` record the number of prompts of each call; returns the record."""
    calls, encode = [], encoder.encode
    monkeypatch.setattr(encoder, "encode", lambda prompts: calls.append(len(prompts)) or encode(prompts))
    return calls


def test_rows_equal_encode_exactly_and_the_file_is_plain_safetensors(tmp_path, encoder):
    store = EmbeddingStore.open(tmp_path, encoder, CAPTIONS, progress=False)
    embeddings, key_mask = encoder.encode(CAPTIONS)  # (U, T, D), (U, T)
    assert store.built and len(store) == len(CAPTIONS)
    assert store.path == tmp_path / f"text-embeddings-{cache_key(encoder, CAPTIONS)}.safetensors"
    rows = [3, 0, 3, 5, 1]  # any order, repeats
    got_embeddings, got_mask = store.get(rows)
    assert got_embeddings.dtype == torch.float32 and got_mask.dtype == torch.bool
    assert torch.equal(got_embeddings, embeddings[rows]) and torch.equal(got_mask, key_mask[rows])
    plain = load_file(store.path)  # written by hand, read by safetensors itself
    assert torch.equal(plain["embeddings"], embeddings) and torch.equal(plain["key_mask"], key_mask)
    assert [p.name for p in tmp_path.iterdir()] == [store.path.name]  # no temporary file left


def test_rows_written_in_several_batches_land_in_their_place(tmp_path, encoder, monkeypatch):
    monkeypatch.setattr(embedding_store, "ENCODE_BATCH", 4)  # 6 captions: batches of 4 and 2
    calls = count_encodes(encoder, monkeypatch)
    store = EmbeddingStore.open(tmp_path, encoder, CAPTIONS, progress=False)
    assert calls == [4, 2]
    expected = EmbeddingCache(encoder, batch_size=4).get(CAPTIONS)  # the in-memory cache, same batches
    for got, want in zip(store.get(range(len(CAPTIONS))), expected):
        assert torch.equal(got, want)


def test_a_second_open_reuses_the_file_without_encoding(tmp_path, encoder, monkeypatch):
    first = EmbeddingStore.open(tmp_path, encoder, CAPTIONS, progress=False)
    modified = first.path.stat().st_mtime_ns
    calls = count_encodes(encoder, monkeypatch)
    second = EmbeddingStore.open(tmp_path, encoder, CAPTIONS, progress=False)
    assert calls == [] and not second.built and second.path == first.path
    assert first.path.stat().st_mtime_ns == modified
    assert torch.equal(second.get([2])[0], encoder.encode([CAPTIONS[2]])[0])


def test_the_key_ignores_where_the_encoder_was_loaded_from(tmp_path, encoder):
    for name in ("run-a", "run-b"):
        encoder.save_pretrained(tmp_path / name)
    loaded = [
        TextEncoder.from_pretrained(tmp_path / name, max_length=MAX_LENGTH, concat_token_embeddings=True)
        for name in ("run-a", "run-b")
    ]
    assert cache_key(loaded[0], CAPTIONS) == cache_key(loaded[1], CAPTIONS) == cache_key(encoder, CAPTIONS)
    encoder.encode(["a red circle"])  # call state is not part of the key
    assert cache_key(encoder, CAPTIONS) == cache_key(loaded[0], CAPTIONS)


def changed_weight(tokenizer):
    encoder = tiny_encoder(tokenizer)
    with torch.no_grad():
        encoder.model.final_layer_norm.weight[0] += 1e-3
    return encoder


@pytest.mark.parametrize(
    "change",
    [
        lambda tokenizer: (tiny_encoder(tokenizer), CAPTIONS[:-1] + ["two red squares."]),
        lambda tokenizer: (changed_weight(tokenizer), CAPTIONS),
        lambda tokenizer: (tiny_encoder(tokenizer, mask_eos=False), CAPTIONS),
        lambda tokenizer: (tiny_encoder(tokenizer, hidden_layer=-2), CAPTIONS),
        lambda tokenizer: (tiny_encoder(tokenizer, max_length=MAX_LENGTH - 2), CAPTIONS),
        lambda tokenizer: (tiny_encoder(tokenizer, concat_token_embeddings=False), CAPTIONS),
        lambda tokenizer: (
            TextEncoder(
                fit_tokenizer(CAPTIONS * 2, 560, MAX_LENGTH),
                tiny_encoder(tokenizer).model,
                concat_token_embeddings=True,
            ),
            CAPTIONS,
        ),
    ],
    ids=["a caption", "a weight", "mask_eos", "hidden_layer", "max_length", "concat_token_embeddings", "tokenizer"],
)
def test_another_caption_or_encoder_gets_its_own_file(tmp_path, tokenizer, encoder, change, monkeypatch):
    first = EmbeddingStore.open(tmp_path, encoder, CAPTIONS, progress=False)
    other_encoder, captions = change(tokenizer)
    calls = count_encodes(other_encoder, monkeypatch)
    second = EmbeddingStore.open(tmp_path, other_encoder, captions, progress=False)
    assert second.built and calls and second.path != first.path and first.path.is_file()
    for got, want in zip(second.get(range(len(captions))), other_encoder.encode(captions)):
        assert torch.equal(got, want)


def wrong_key(path, encoder):
    embeddings, key_mask = encoder.encode(CAPTIONS)
    save_file(
        {"embeddings": embeddings, "key_mask": key_mask},
        path,
        metadata={"format": embedding_store.FORMAT, "key": "0" * 64},
    )


def wrong_shape(path, encoder):
    embeddings, key_mask = encoder.encode(CAPTIONS[:-1])
    save_file(
        {"embeddings": embeddings, "key_mask": key_mask},
        path,
        metadata={"format": embedding_store.FORMAT, "key": cache_key(encoder, CAPTIONS)},
    )


def flipped_header(path, encoder):
    data = bytearray(path.read_bytes())
    header_length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_length])
    header["key_mask"]["dtype"] = "U8"
    text = json.dumps(header).encode().ljust(header_length)
    path.write_bytes(bytes(data[:8]) + text + bytes(data[8 + header_length :]))


def flipped_byte(where):
    """Flip one bit of the data (`where`: a fraction of the way from the data's start to the
    file's end), leaving the header and the size as written."""

    def corrupt(path, encoder):
        data = bytearray(path.read_bytes())
        start = 8 + int.from_bytes(data[:8], "little")
        data[start + int(where * (len(data) - start - 1))] ^= 0x10
        path.write_bytes(bytes(data))

    return corrupt


@pytest.mark.parametrize(
    "corrupt",
    [
        flipped_byte(0.3),
        flipped_byte(1.0),
        lambda path, encoder: path.write_bytes(path.read_bytes()[:-100]),
        lambda path, encoder: path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2]),
        lambda path, encoder: path.write_bytes(b""),
        lambda path, encoder: path.write_bytes(b"\x00\xff not a safetensors file " * 20),
        lambda path, encoder: path.write_bytes(path.read_bytes() + b"extra"),
        wrong_key,
        wrong_shape,
        flipped_header,
    ],
    ids=[
        "bit-in-embeddings",
        "bit-in-key-mask",
        "truncated",
        "half",
        "empty",
        "garbage",
        "appended",
        "wrong-key",
        "wrong-shape",
        "wrong-dtype",
    ],
)
def test_a_corrupt_file_is_rebuilt_with_a_one_line_warning(tmp_path, encoder, corrupt, monkeypatch):
    path = EmbeddingStore.open(tmp_path, encoder, CAPTIONS, progress=False).path
    corrupt(path, encoder)
    calls = count_encodes(encoder, monkeypatch)
    with pytest.warns(UserWarning, match="is unusable .*; rebuilding it") as record:
        store = EmbeddingStore.open(tmp_path, encoder, CAPTIONS, progress=False)
    assert len(record) == 1 and "\n" not in str(record[0].message)
    assert store.built and calls and store.path == path
    for got, want in zip(store.get(range(len(CAPTIONS))), encoder.encode(CAPTIONS)):
        assert torch.equal(got, want)


def test_a_failed_write_is_a_user_error_and_leaves_nothing_half_written(tmp_path, encoder, monkeypatch):
    path = EmbeddingStore.open(tmp_path, encoder, CAPTIONS, progress=False).path
    path.write_bytes(b"garbage")

    def disk_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(embedding_store.os, "fsync", disk_full)
    with (
        pytest.warns(UserWarning, match="rebuilding"),
        pytest.raises(UserError, match="No space left on device.*data.embedding_cache") as error,
    ):
        EmbeddingStore.open(tmp_path, encoder, CAPTIONS, progress=False)
    assert "\n" not in str(error.value)
    assert [p.name for p in tmp_path.iterdir()] == [path.name] and path.read_bytes() == b"garbage"


def test_an_interrupted_build_leaves_no_file(tmp_path, encoder, monkeypatch):
    monkeypatch.setattr(embedding_store, "ENCODE_BATCH", 2)
    encode = encoder.encode
    calls = []

    def interrupted(prompts):
        calls.append(prompts)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return encode(prompts)

    monkeypatch.setattr(encoder, "encode", interrupted)
    with pytest.raises(KeyboardInterrupt):
        EmbeddingStore.open(tmp_path, encoder, CAPTIONS, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_the_cache_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_folder(None) == tmp_path / "xdg" / "tiny-t2i-diffusion" / "embeddings"
    assert cache_folder(None).is_dir()
    assert cache_folder(str(tmp_path / "a" / "b")) == tmp_path / "a" / "b"
    (tmp_path / "file").write_text("x")
    with pytest.raises(
        UserError,
        match=r"^data.embedding_cache: cannot create the folder .*file/sub.*; set "
        r"data.embedding_cache to a folder you can write",
    ) as error:
        cache_folder(str(tmp_path / "file" / "sub"))
    assert "\n" not in str(error.value)


def test_a_copy_of_an_encoder_has_the_same_key(encoder):
    assert cache_key(copy.deepcopy(encoder), CAPTIONS) == cache_key(encoder, CAPTIONS)
    assert cache_key(encoder, CAPTIONS) != cache_key(encoder, list(reversed(CAPTIONS)))  # row order counts
