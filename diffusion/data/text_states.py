"""A caption's text states (`TextEncoder.encode`: embeddings and key mask), computed once with
the frozen encoder and kept, behind one interface, `get(...) -> (embeddings, key_mask)`, in two
backends:

- `EmbeddingCache`, in memory: computed on first use, one row per distinct caption. For the
  generated shapes (a few thousand captions, T x D small): training keeps them all on its device.
- `EmbeddingStore`, on disk: the rows of an image folder's captions (tens of thousands of them, a
  pretrained CLIP's 77 x 1024 states each: more than memory holds), written once to a safetensors
  file that is read a batch of rows at a time; a row number is the caption's index in the list
  the store was opened with.

(The editor keeps its last few prompts' states with `TextEncoder.remember`, on the encoder.)

On disk: with a 77-token pretrained CLIP and its token embeddings appended, one caption's states
are 77 x 1024 float32, about 0.3 MB: 30 GB per 100k captions. So the states of each distinct
caption are written once to a safetensors file,

    <folder>/text-embeddings-<key>.safetensors
        embeddings   (U, T, D) float32   `TextEncoder.encode` of the U captions, in their order
        key_mask     (U, T) bool
        __metadata__ {"format": FORMAT, "key": <key>, "embeddings_sha256": ..., "key_mask_sha256": ...}

and a batch reads only its rows (`safe_open`, memory-mapped). The key is a SHA-256 of everything
the rows depend on: the encoder's weights, model config and tokenizer, its options (max_length,
hidden_layer, mask_eos, concat_token_embeddings) and the captions in row order. It names the file
and is stored in it, so another encoder or caption list gets another file, and a file is used
only if its key, shapes, dtypes and the SHA-256 of each tensor's bytes are the expected ones;
anything else (a truncated or garbled file, a changed byte) is rebuilt with a one-line warning.
Checking the bytes reads the whole file once when a run opens it. Files are written under a
temporary name and renamed when complete. Files of other keys are left alone: another run may use them.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from diffusion.errors import UserError
from diffusion.model.text_encoder import TextEncoder, _check_prompts

FORMAT = "tiny-t2i-diffusion text embeddings 2"
ENCODE_BATCH = 256  # captions encoded at once while building


def default_folder() -> Path:
    """The user's cache: $XDG_CACHE_HOME (or ~/.cache)/tiny-t2i-diffusion/embeddings."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tiny-t2i-diffusion" / "embeddings"


def cache_folder(setting: str | None) -> Path:
    """The folder data.embedding_cache names (None: `default_folder()`), created if missing; a
    one-line UserError naming the key if it cannot be created or read."""
    folder = Path(setting).expanduser() if setting else default_folder()
    fix = "set data.embedding_cache to a folder you can write, or null for the user cache"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(
            f"data.embedding_cache: cannot create the folder '{folder}' ({error.strerror}); {fix}"
        ) from None
    if not os.access(folder, os.R_OK | os.X_OK):
        raise UserError(f"data.embedding_cache: the folder '{folder}' cannot be read; {fix}")
    return folder


def cache_key(encoder: TextEncoder, captions: list[str]) -> str:
    """SHA-256 (hex) of what the rows of `captions` depend on (see the module docstring)."""
    digest = hashlib.sha256(FORMAT.encode())
    config = encoder.model.config.to_dict()
    for where_from in ("_name_or_path", "transformers_version"):  # the same model loaded from elsewhere
        config.pop(where_from, None)
    tokenizer = json.loads(encoder.tokenizer.backend_tokenizer.to_str())
    for call_state in ("truncation", "padding"):  # set by the last call, not part of the tokenizer
        tokenizer.pop(call_state, None)
    settings = {
        "max_length": encoder.max_length,
        "hidden_layer": encoder.hidden_layer,
        "mask_eos": encoder.mask_eos,
        "concat_token_embeddings": encoder.concat_token_embeddings,
        "model": config,
        "tokenizer": tokenizer,
    }
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    for name, tensor in sorted(encoder.model.state_dict().items()):
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    for caption in captions:
        text = caption.encode("utf-8", "surrogatepass")
        digest.update(len(text).to_bytes(8, "little") + text)
    return digest.hexdigest()


class EmbeddingCache:
    """Text embeddings of a frozen encoder, computed once per distinct caption and kept on the CPU.

    Rows live in one growing tensor (capacity doubles when full) with a caption -> row dict, so a
    batch lookup is a single index operation. Memory: T * D * 4 bytes per distinct caption
    (16 KiB at T=32, D=128).
    """

    def __init__(self, encoder: TextEncoder, batch_size: int = 256):
        """encoder: the frozen text encoder.
        batch_size: how many new captions to encode at once.
        """
        self.encoder = encoder
        self.batch_size = batch_size
        self._row_of: dict[str, int] = {}
        shape = (encoder.max_length,)
        self._embeddings = torch.empty(0, *shape, encoder.embedding_dim)  # (capacity, T, D)
        self._key_mask = torch.empty(0, *shape, dtype=torch.bool)  # (capacity, T)

    def __len__(self) -> int:
        """Number of distinct captions cached."""
        return len(self._row_of)

    def get(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings (B, T, D) float32 and key mask (B, T) bool on the CPU, as `encoder.encode` gives."""
        self._add(captions, progress=False)
        rows = torch.tensor([self._row_of[caption] for caption in captions], dtype=torch.long)  # (B,)
        return self._embeddings[rows], self._key_mask[rows]

    def precompute(self, captions: list[str], progress: bool = True) -> None:
        """Encode every caption not cached yet, e.g. the whole training set before training.

        captions: captions, repeats allowed.
        progress: show a tqdm bar over batches.
        """
        self._add(captions, progress=progress)

    def _add(self, captions, progress):
        """Encode and store the captions not cached yet, `batch_size` at a time."""
        _check_prompts(captions)
        new = [caption for caption in dict.fromkeys(captions) if caption not in self._row_of]
        starts = range(0, len(new), self.batch_size)
        for start in tqdm(starts, desc="text embeddings", disable=not progress or not new):
            chunk = new[start : start + self.batch_size]
            embeddings, key_mask = self.encoder.encode(chunk)
            first = len(self._row_of)
            self._reserve(first + len(chunk))
            self._embeddings[first : first + len(chunk)] = embeddings.cpu()
            self._key_mask[first : first + len(chunk)] = key_mask.cpu()
            self._row_of.update((caption, first + offset) for offset, caption in enumerate(chunk))

    def _reserve(self, rows):
        """Grow storage to hold at least `rows` rows; doubling keeps appends amortised O(1)."""
        capacity = len(self._embeddings)
        if rows <= capacity:
            return
        capacity = max(rows, 2 * capacity)
        embeddings = torch.empty(capacity, *self._embeddings.shape[1:])
        key_mask = torch.zeros(capacity, *self._key_mask.shape[1:], dtype=torch.bool)
        embeddings[: len(self)] = self._embeddings[: len(self)]
        key_mask[: len(self)] = self._key_mask[: len(self)]
        self._embeddings, self._key_mask = embeddings, key_mask


class EmbeddingStore:
    """The on-disk text states of a list of captions: row i holds captions[i]'s."""

    def __init__(self, path: Path, rows: int, built: bool):
        """path: a checked store file of `rows` captions; built: whether this process wrote it
        (rather than reusing it)."""
        self.path, self.rows, self.built = path, rows, built

    @classmethod
    def open(cls, folder: Path, encoder: TextEncoder, captions: list[str], progress: bool = True) -> EmbeddingStore:
        """The store of `captions` (distinct, in row order) under `encoder`, from `folder`: the
        file of their key if it is whole, else encoded and written now (encoder on its device)."""
        key = cache_key(encoder, captions)
        path = Path(folder) / f"text-embeddings-{key}.safetensors"
        shape = (len(captions), encoder.max_length, encoder.embedding_dim)
        problem = _problem(path, key, shape) if path.exists() else None
        if problem:
            warnings.warn(f"text-embedding cache '{path}' is unusable ({problem}); rebuilding it")
        built = problem is not None or not path.exists()
        if built:
            _build(path, key, encoder, captions, progress)
            problem = _problem(path, key, shape)
            if problem:  # e.g. the disk handed back something else than was written
                raise UserError(
                    f"text-embedding cache '{path}' is unreadable right after writing it ({problem}); "
                    "set data.embedding_cache to a folder on another disk"
                )
        return cls(path, len(captions), built)

    def __len__(self) -> int:
        return self.rows

    def get(self, rows) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings (B, T, D) float32 and key mask (B, T) bool of `rows` (B ints)."""
        # Opened per call: a handle kept open keeps every page read so far mapped, and the resident
        # memory of a long run would grow towards the file's size.
        with safe_open(self.path, framework="pt") as file:
            embeddings, key_mask = file.get_slice("embeddings"), file.get_slice("key_mask")
            picked = [int(row) for row in rows]
            return (
                torch.cat([embeddings[row : row + 1] for row in picked]),
                torch.cat([key_mask[row : row + 1] for row in picked]),
            )


def _problem(path: Path, key: str, shape: tuple[int, int, int]) -> str | None:
    """Why the file at `path` is not the store of `key` with `shape` (U, T, D), or None if it is."""
    rows, length, dim = shape
    try:
        with safe_open(path, framework="pt") as file:
            metadata = file.metadata() or {}
            if metadata.get("format") != FORMAT or metadata.get("key") != key:
                return "its metadata names another format or key"
            if set(file.keys()) != {"embeddings", "key_mask"}:
                return f"it holds {sorted(file.keys())}, not embeddings and key_mask"
            embeddings, key_mask = file.get_slice("embeddings"), file.get_slice("key_mask")
            found = (embeddings.get_shape(), embeddings.get_dtype(), key_mask.get_shape(), key_mask.get_dtype())
            if found != ([rows, length, dim], "F32", [rows, length], "BOOL"):
                return f"its tensors are {found}, expected {([rows, length, dim], 'F32', [rows, length], 'BOOL')}"
        if _digests(path, rows * length * dim * 4, rows * length) != (
            metadata.get("embeddings_sha256"),
            metadata.get("key_mask_sha256"),
        ):
            return "its bytes changed since it was written (SHA-256)"
    except Exception as error:  # any failure to read the file (truncated, garbage, no access) means rebuild it
        return " ".join(str(error).split())[:200] or type(error).__name__
    return None


def _digests(path: Path, embedding_bytes: int, mask_bytes: int) -> tuple[str, str]:
    """SHA-256 (hex) of the embeddings' bytes and of the key mask's, as they lie in the file."""
    digests = []
    with open(path, "rb") as file:
        file.seek(8 + int.from_bytes(file.read(8), "little"))
        for size in (embedding_bytes, mask_bytes):
            digest = hashlib.sha256()
            while size > 0:
                chunk = file.read(min(size, 1 << 24))
                if not chunk:
                    raise ValueError("the file ends early")
                digest.update(chunk)
                size -= len(chunk)
            digests.append(digest.hexdigest())
    return digests[0], digests[1]


def _build(path: Path, key: str, encoder: TextEncoder, captions: list[str], progress: bool) -> None:
    """Encode `captions` in batches and write the store file of `key` to `path`, through a
    temporary file renamed when complete. The safetensors layout is written by hand (an 8-byte
    header length, the JSON header, the data) because safetensors' writer needs every tensor in
    memory at once."""
    rows, length, dim = len(captions), encoder.max_length, encoder.embedding_dim
    embedding_bytes, mask_bytes = rows * length * dim * 4, rows * length
    unknown = "0" * 64  # the digests' places, filled in once the data is written
    header = {
        "__metadata__": {"format": FORMAT, "key": key, "embeddings_sha256": unknown, "key_mask_sha256": unknown},
        "embeddings": {"dtype": "F32", "shape": [rows, length, dim], "data_offsets": [0, embedding_bytes]},
        "key_mask": {
            "dtype": "BOOL",
            "shape": [rows, length],
            "data_offsets": [embedding_bytes, embedding_bytes + mask_bytes],
        },
    }

    def header_bytes() -> bytes:
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
        return len(text).to_bytes(8, "little") + text

    start = len(header_bytes())
    digests = hashlib.sha256(), hashlib.sha256()  # the rows are written in order in each tensor
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(temporary, "wb") as file:
            file.write(header_bytes())
            file.truncate(start + embedding_bytes + mask_bytes)
            for first in tqdm(range(0, rows, ENCODE_BATCH), desc="text embeddings", disable=not progress):
                embeddings, key_mask = encoder.encode(captions[first : first + ENCODE_BATCH])  # (b, T, D), (b, T)
                for digest, offset, data in (
                    (digests[0], start + first * length * dim * 4, embeddings.cpu().numpy().astype("<f4")),
                    (digests[1], start + embedding_bytes + first * length, key_mask.cpu().numpy()),
                ):
                    data = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
                    digest.update(data)
                    file.seek(offset)
                    file.write(data)
            metadata = header["__metadata__"]
            metadata["embeddings_sha256"], metadata["key_mask_sha256"] = (d.hexdigest() for d in digests)
            file.seek(0)
            file.write(header_bytes())  # the same length: the digests replace as many zeros
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except OSError as error:
        raise UserError(
            f"cannot write the text-embedding cache '{path}' ({error.strerror or error}); free some "
            "space or set data.embedding_cache to a folder you can write"
        ) from None
    finally:
        temporary.unlink(missing_ok=True)
