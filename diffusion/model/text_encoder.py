"""Frozen CLIP text embeddings for the UNet's cross-attention.

Two sources of a CLIP text encoder, both loaded the same way by `TextEncoder.from_pretrained`:

- any pretrained CLIP, by hub id or local folder (e.g. `openai/clip-vit-base-patch32`);
- the offline default: a small CLIP trained here (clip_training.py), saved as `tokenizer/` +
  `text_encoder/` in the transformers format, so it loads exactly like a pretrained one.

The encoder is frozen and deterministic, so a caption's text states can be kept instead of
computed again: `TextEncoder.remember(n)` keeps the last n calls' (the editor's prompts), and
diffusion/data/text_states.py keeps a training set's captions, in memory or on disk.
"""

import contextlib
import warnings
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn
from transformers import (
    CLIPTextModel,
    CLIPTokenizer,
    PretrainedConfig,
)
from transformers.convert_slow_tokenizer import bytes_to_unicode
from transformers.utils import logging as transformers_logging

from diffusion.errors import UserError

# CLIP's byte-level alphabet: one printable character per byte value, so any text maps onto it.
BYTE_ALPHABET = list(bytes_to_unicode().values())


@contextlib.contextmanager
def quiet_transformers():
    """Silence transformers' progress bars and load reports while loading or saving our own files.

    The reports list the vision weights of a full CLIP checkpoint as unused, which is expected
    here; we check for missing weights ourselves.
    """
    verbosity = transformers_logging.get_verbosity()
    bars = transformers_logging.is_progress_bar_enabled()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(verbosity)
        if bars:
            transformers_logging.enable_progress_bar()


def _load_clip_text(name_or_path: str) -> tuple[CLIPTokenizer, CLIPTextModel]:
    """Load a CLIP tokenizer and text model; raise a one-line UserError on any failure.

    name_or_path: a folder with `tokenizer/` and `text_encoder/` (our export, or a diffusers
        pipeline), or a folder or hub id of a plain CLIP (weights and tokenizer at its root).
    """
    path = Path(name_or_path).expanduser()
    hint = (
        "give a local folder with tokenizer/ and text_encoder/, or a CLIP folder or hub id "
        "such as openai/clip-vit-base-patch32"
    )
    # A path-like name that does not exist is a typo, not a hub id: say so at once instead of
    # waiting for the hub to time out.
    path_like = (
        path.is_absolute() or name_or_path.startswith((".", "~")) or ("/" in name_or_path and path.parent.is_dir())
    )
    if not path.is_dir() and path_like:
        raise UserError(f"could not load a CLIP text encoder from '{name_or_path}': no such folder; {hint}")
    split = path.is_dir() and (path / "text_encoder").is_dir()
    source = str(path) if path.is_dir() else name_or_path
    model_folder, tokenizer_folder = ("text_encoder", "tokenizer") if split else ("", "")
    try:
        with quiet_transformers():
            # The model first: CLIPTokenizer.from_pretrained "succeeds" with an empty vocabulary
            # when there are no tokenizer files, whereas a missing model raises.
            config, _ = PretrainedConfig.get_config_dict(source, subfolder=model_folder)
            if config.get("model_type") not in ("clip", "clip_text_model"):
                kind = config.get("model_type")
                raise ValueError(f"its config.json describes a {kind!r} model, not a CLIP text model")
            # A local folder is read from safetensors only: a pickled .bin beside it is never unpickled.
            safe = True if path.is_dir() else None
            model, info = CLIPTextModel.from_pretrained(
                source, subfolder=model_folder, output_loading_info=True, use_safetensors=safe
            )
            tokenizer = CLIPTokenizer.from_pretrained(source, subfolder=tokenizer_folder)
    except Exception as error:  # any failure to read user files is a bad path, not a bug
        detail = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        if not path.is_dir():
            detail = f"no such folder, and the hub failed (offline?): {detail}"
        raise UserError(f"could not load a CLIP text encoder from '{name_or_path}': {detail}; {hint}") from None
    if info["missing_keys"]:
        raise UserError(
            f"'{name_or_path}' holds no CLIP text weights (missing {len(info['missing_keys'])} "
            f"tensors, e.g. {sorted(info['missing_keys'])[0]}); {hint}"
        )
    if len(tokenizer) < len(BYTE_ALPHABET):
        raise UserError(
            f"'{name_or_path}' has no CLIP tokenizer files (vocab.json + merges.txt or tokenizer.json); {hint}"
        )
    if len(tokenizer) > model.config.vocab_size:
        raise UserError(
            f"'{name_or_path}': the tokenizer has {len(tokenizer)} tokens but the text model only "
            f"{model.config.vocab_size}; they come from different models, use a matching pair"
        )
    return tokenizer, model


class RecentResults:
    """The results of the last `size` distinct calls of a deterministic function (a text
    encoder's), least recently used first out; `size` 0 keeps none. Each OrderedDict call is
    atomic under the GIL, so two threads (the editor's request and compile threads) may share it
    without a lock: a race costs a computation, never a wrong result."""

    def __init__(self, size: int):
        self.size = size
        self._results: OrderedDict = OrderedDict()

    def get(self, key, compute):
        """The result kept for `key`, or `compute()`'s, then kept (when `size` allows)."""
        found = self._results.get(key)
        if found is None:
            found = compute()
            if self.size:
                self._results[key] = found
                self._trim()
        else:
            with contextlib.suppress(KeyError):  # another thread may have just let it go
                self._results.move_to_end(key)
        return found

    def resize(self, size: int) -> None:
        self.size = size
        self._trim()

    def clear(self) -> None:
        self._results.clear()

    def _trim(self) -> None:
        while len(self._results) > self.size:
            with contextlib.suppress(KeyError):
                self._results.popitem(last=False)

    def __len__(self) -> int:
        return len(self._results)

    def __contains__(self, key) -> bool:
        return key in self._results


class TextEncoder(nn.Module):
    """A frozen CLIP text model that turns prompts into per-token embeddings for cross-attention."""

    def __init__(
        self,
        tokenizer: CLIPTokenizer,
        model: CLIPTextModel,
        max_length: int | None = None,
        hidden_layer: int = -1,
        mask_eos: bool = True,
        concat_token_embeddings: bool = True,
    ):
        """tokenizer: the CLIP tokenizer matching `model`.
        model: a CLIP text model; it is frozen (no gradients, always in eval mode).
        max_length: tokens per prompt (start and end included); defaults to the tokenizer's
            `model_max_length`, capped at the model's position embeddings.
        hidden_layer: which layer's output to use: -1 the last, -2 the penultimate ("clip
            skip"), ...; the final layer norm is applied either way.
        mask_eos: hide the end-of-text token from the UNet, leaving only the words and the
            start token.
        concat_token_embeddings: append each token's own embedding (the embedding layer, final
            layer norm applied) to the chosen layer's states, D -> 2D features: the UNet sees
            what the word is as well as its context. A small CLIP trained here blurs words it
            did not need for retrieval ("left" and "right" in the same caption come out nearly
            the same at its last layer, not at the embedding layer).
        """
        super().__init__()
        positions = model.config.max_position_embeddings
        layers = model.config.num_hidden_layers
        if max_length is None:
            max_length = min(tokenizer.model_max_length, positions)
        if not 3 <= max_length <= positions:
            raise UserError(f"text max_length {max_length} is out of range; this CLIP takes 3 to {positions} tokens")
        # -(layers + 1) is the embedding layer: each token's own embedding, with no context mixed in
        if not -(layers + 1) <= hidden_layer <= -1:
            raise UserError(
                f"text hidden_layer {hidden_layer} is out of range; this CLIP has layers -1 to "
                f"{-(layers + 1)} (the token embeddings)"
            )
        self.tokenizer = tokenizer
        self.model = model.requires_grad_(False).eval()
        self.hidden_layer = hidden_layer
        self.mask_eos = mask_eos
        self.concat_token_embeddings = concat_token_embeddings
        self._max_length = max_length
        self._remembered = RecentResults(0)  # the calls `encode` keeps (`remember`); 0: none

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | Path,
        max_length: int | None = None,
        hidden_layer: int = -1,
        mask_eos: bool = True,
        concat_token_embeddings: bool = True,
    ) -> "TextEncoder":
        """Load a CLIP text encoder.

        name_or_path: a folder with `tokenizer/` and `text_encoder/` (from `train_clip` or
            `save_pretrained`, or a diffusers pipeline), or a folder or hub id of a plain CLIP
            (a CLIPModel or CLIPTextModel checkpoint with its tokenizer files at the root).
        max_length, hidden_layer, mask_eos, concat_token_embeddings: as in `TextEncoder.__init__`.
        """
        tokenizer, model = _load_clip_text(str(name_or_path))
        return cls(
            tokenizer,
            model,
            max_length=max_length,
            hidden_layer=hidden_layer,
            mask_eos=mask_eos,
            concat_token_embeddings=concat_token_embeddings,
        )

    @property
    def embedding_dim(self) -> int:
        """Size D of each token embedding (twice the CLIP width with concat_token_embeddings)."""
        return self.model.config.hidden_size * (2 if self.concat_token_embeddings else 1)

    @property
    def max_length(self) -> int:
        """Tokens per prompt T, start and end tokens included."""
        return self._max_length

    def _apply(self, *args, **kwargs):
        self._remembered.clear()  # moved (`to`) or cast: kept results are on the old device or dtype
        return super()._apply(*args, **kwargs)

    def train(self, mode: bool = True) -> "TextEncoder":
        """Stay in eval mode: a parent module's `.train()` must not unfreeze the encoder's behaviour."""
        return super().train(False)

    def tokenize(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Tokenize prompts to exactly `max_length` tokens, warning about any text cut off.

        prompts: B prompts.

        Returns `input_ids` (B, T) long; `attention_mask` (B, T) long, 1 for real tokens (start
        and end included); `offsets` (B, T, 2) long, each token's [start, end) character span in
        its prompt ((0, 0) for special and padding tokens).
        """
        _check_prompts(prompts)
        tokens = self.tokenizer(
            prompts,
            padding="max_length",
            padding_side="right",  # key_mask finds the end token by counting real tokens from the left
            truncation=True,
            max_length=self.max_length,
            return_offsets_mapping=True,
            return_tensors="pt",
        )
        # Only a prompt that fills every position can have been cut.
        full = [prompt for prompt, last in zip(prompts, tokens["attention_mask"][:, -1]) if last]
        if full:
            self._warn_truncated(full)
        return {
            "input_ids": tokens["input_ids"],
            "attention_mask": tokens["attention_mask"],
            "offsets": tokens["offset_mapping"],
        }

    def options(self) -> dict:
        """The settings `__init__` takes besides the model and tokenizer (saved with a pipeline)."""
        return {
            "max_length": self.max_length,
            "hidden_layer": self.hidden_layer,
            "mask_eos": self.mask_eos,
            "concat_token_embeddings": self.concat_token_embeddings,
        }

    def offsets(self, prompts: list[str]) -> torch.Tensor:
        """(B, T, 2) each token's character span, as `tokenize` gives them, without its truncation
        warning (for a prompt that is also encoded, which warns once)."""
        return self._quiet_tokenize(prompts)["offsets"]

    def token_ids(self, prompts: list[str]) -> torch.Tensor:
        """(B, T) token ids, as `tokenize` gives them, without its truncation warning."""
        return self._quiet_tokenize(prompts)["input_ids"]

    def _quiet_tokenize(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return self.tokenize(prompts)

    def _warn_truncated(self, prompts: list[str]) -> None:
        """Warn once about the prompts longer than `max_length` tokens, quoting the text cut off."""
        untruncated = self.tokenizer(prompts, return_offsets_mapping=True, verbose=False)
        cuts = []
        for prompt, ids, offsets in zip(prompts, untruncated["input_ids"], untruncated["offset_mapping"]):
            if len(ids) > self.max_length:
                # Kept: start token + the first T-2 tokens + end token; cut: tokens T-1 .. n-2.
                cuts.append(prompt[offsets[self.max_length - 1][0] : offsets[len(ids) - 2][1]])
        if not cuts:
            return
        # One warning per call, so encoding thousands of long captions does not flood the log.
        quoted = ", ".join(f'"{cut}"' for cut in cuts[:3]) + (f" and {len(cuts) - 3} more" if len(cuts) > 3 else "")
        subject = "prompt" if len(cuts) == 1 else f"{len(cuts)} prompts"
        warnings.warn(f"{subject} truncated to {self.max_length} tokens; cut: {quoted}", stacklevel=3)

    def remember(self, calls: int) -> None:
        """Keep the results of the last `calls` calls of `encode` (0: none, the default), least
        recently used first out, and give a call with the same prompts a copy of its result. The
        editor's every render encodes its prompt, the empty prompt of guidance and, for
        down-weighted words, the prompt without them; a moved slider or a new seed asks for most of
        these again. The encoder is deterministic, so a kept result is the one it would compute.
        The key is the whole list: a batch's rows are kept as that batch computed them."""
        self._remembered.resize(calls)

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed prompts token by token.

        prompts: B prompts; longer ones are truncated with a warning (once: a remembered call,
        see `remember`, is not tokenized again).

        Returns `embeddings` (B, T, D) float32 and `key_mask` (B, T) bool, on the model's device.
        `key_mask` is True where cross-attention may look: every real token except padding and,
        with `mask_eos`, the end token. The start token is always kept, so even the empty prompt
        has one True.
        """
        if not self._remembered.size:
            return self._encode(prompts)
        _check_prompts(prompts)
        embeddings, key_mask = self._remembered.get(tuple(prompts), lambda: self._encode(prompts))
        return embeddings.clone(), key_mask.clone()  # the caller may write into its copy

    @torch.no_grad()
    def _encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """`encode`, computed."""
        tokens = self.tokenize(prompts)
        device = self.model.device
        input_ids = tokens["input_ids"].to(device)  # (B, T)
        attention_mask = tokens["attention_mask"].to(device)  # (B, T)
        # No padding mask for the model: CLIP is causal, so real tokens never see the padding
        # after them, and padded positions are hidden by key_mask anyway.
        all_layers = self.hidden_layer != -1 or self.concat_token_embeddings
        output = self.model(input_ids=input_ids, output_hidden_states=all_layers)
        if self.hidden_layer == -1:
            embeddings = output.last_hidden_state  # (B, T, D), after the final layer norm
        else:
            embeddings = self.model.final_layer_norm(output.hidden_states[self.hidden_layer])  # (B, T, D)
        if self.concat_token_embeddings:
            own = self.model.final_layer_norm(output.hidden_states[0])  # (B, T, D): no context mixed in
            embeddings = torch.cat([embeddings, own], dim=-1)  # (B, T, 2D)

        key_mask = attention_mask.bool()  # (B, T)
        if self.mask_eos:
            # By position, not id: the pad token is the end token in OpenAI's CLIP. The end token
            # is at index >= 1, so the start token at 0 stays.
            end = attention_mask.sum(1) - 1  # (B,)
            key_mask[torch.arange(len(prompts), device=device), end] = False
        return embeddings.float(), key_mask

    def save_pretrained(self, out_dir: str | Path) -> None:
        """Write `out_dir/tokenizer` and `out_dir/text_encoder`, the layout `from_pretrained` reads.

        `max_length`, `hidden_layer` and `mask_eos` are not saved: they belong to the caller's config.
        """
        out_dir = Path(out_dir)
        self.tokenizer.save_pretrained(out_dir / "tokenizer")
        with quiet_transformers():
            self.model.save_pretrained(out_dir / "text_encoder")


def _check_prompts(prompts):
    """Raise UserError unless `prompts` is a non-empty list of strings."""
    if isinstance(prompts, str) or not prompts:
        raise UserError("prompts must be a non-empty list of strings; wrap a single prompt in a list")
    for index, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise UserError(f"prompt {index} is {type(prompt).__name__} {prompt!r}, not text; quote it in the config")
