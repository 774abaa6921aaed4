"""Built-in text encoder: UTF-8 bytes -> a small transformer, trained jointly with the DiT."""
from __future__ import annotations

from dataclasses import dataclass
import json
import re
import zlib
from pathlib import Path
from typing import List, Optional, Sequence

import torch
import torch.nn as nn

from models.config import TextEncoderConfig
from models.layers import MLP, Attention, RMSNorm, cu_seqlens_from_lengths, to_device
from models.precision import frozen_dtype


@dataclass
class TextBatch:
    """A batch of captions, packed: token ids for the built-in encoder, or the embeddings a frozen
    pretrained encoder already computed (then `ids` and `positions` are None)."""

    ids: Optional[torch.Tensor]  # (M,) long
    positions: Optional[torch.Tensor]  # (M,) long
    cu_seqlens: torch.Tensor  # (B + 1,) int32
    max_len: int
    lengths: List[int]  # tokens per caption, on the host (reading them from cu_seqlens would sync the device)
    embeddings: Optional[torch.Tensor] = None  # (M, dim)
    # Each clip's CLIP image tokens (B, tokens, image dim), for a model with an image branch (model.image: Wan 2.1
    # I2V, whose cross-attention reads them beside the caption); models/image_encoder.py.
    images: Optional[torch.Tensor] = None


class ByteTokenizer:
    """Every caption starts with BOS, so the empty (unconditional) caption is one token, never zero."""

    BOS = 1
    OFFSET = 2
    vocab_size = 256 + OFFSET

    def __init__(self, max_tokens: int):
        self.max_tokens = max_tokens

    def encode(self, text: str) -> List[int]:
        return [self.BOS] + [b + self.OFFSET for b in text.encode("utf-8")][: self.max_tokens - 1]

    def batch(self, captions: Sequence[str], device=None) -> TextBatch:
        encoded = [self.encode(c) for c in captions]
        lengths = [len(e) for e in encoded]
        ids = to_device(torch.tensor([i for e in encoded for i in e], dtype=torch.long), device)
        positions = to_device(torch.cat([torch.arange(n) for n in lengths]), device)
        return TextBatch(ids, positions, cu_seqlens_from_lengths(lengths, device), max(lengths), lengths)


class WordTokenizer:
    """Lower-cased words (letters and digits), each hashed into one of `vocab_size` ids; BOS first, as for
    bytes. A word is one token, so a small encoder trained from scratch reads "yellow" as one thing at one
    position instead of composing it from six bytes first (docs: BENCHMARKS.md, the demo experiments).
    crc32, unlike Python's salted hash(), gives every process and every run the same ids."""

    BOS = 1
    OFFSET = 2

    def __init__(self, max_tokens: int, vocab_size: int):
        self.max_tokens, self.vocab_size = max_tokens, vocab_size

    def word_id(self, word: str) -> int:
        return self.OFFSET + zlib.crc32(word.encode("utf-8")) % (self.vocab_size - self.OFFSET)

    def encode(self, text: str) -> List[int]:
        return [self.BOS] + [self.word_id(w) for w in _WORD.findall(text.lower())][: self.max_tokens - 1]

    batch = ByteTokenizer.batch


_WORD = re.compile(r"[^\W_]+")


def builtin_tokenizer(cfg: TextEncoderConfig):
    if cfg.tokenizer == "bytes":
        return ByteTokenizer(cfg.max_tokens)
    if cfg.tokenizer == "words":
        return WordTokenizer(cfg.max_tokens, cfg.vocab_size)
    raise ValueError(f"model.text.tokenizer={cfg.tokenizer!r}: supported: bytes, words")


class TextBlock(nn.Module):
    def __init__(self, cfg: TextEncoderConfig, backend: str):
        super().__init__()
        self.norm1, self.norm2 = RMSNorm(cfg.dim), RMSNorm(cfg.dim)
        self.attn = Attention(cfg.dim, cfg.heads, qk_norm=True, backend=backend)
        self.mlp = MLP(cfg.dim, 4 * cfg.dim)

    def forward(self, x, cu_seqlens, max_len):
        x = x + self.attn(self.norm1(x), cu_seqlens, max_len)
        return x + self.mlp(self.norm2(x))


class TextEncoder(nn.Module):
    def __init__(self, cfg: TextEncoderConfig, backend: str = "auto"):
        super().__init__()
        self.cfg = cfg
        self.tokenizer = builtin_tokenizer(cfg)
        self.token_embed = nn.Embedding(self.tokenizer.vocab_size, cfg.dim)
        self.position_embed = nn.Embedding(cfg.max_tokens, cfg.dim)
        self.blocks = nn.ModuleList(TextBlock(cfg, backend) for _ in range(cfg.depth))
        self.norm = RMSNorm(cfg.dim)
        # Unit-scale embeddings and residual branches that start at zero: the encoder starts as the identity
        # on word + position, so every word reaches the DiT's cross-attention distinct from the first step.
        # With 0.02-scale embeddings under full-size branches, a word's identity was drowned in the caption's
        # average, and a tiny model never learned the object's colour word (BENCHMARKS.md, demo experiments).
        nn.init.normal_(self.token_embed.weight, std=1.0)
        nn.init.normal_(self.position_embed.weight, std=1.0)
        for block in self.blocks:
            for branch_out in (block.attn.out, block.mlp.fc2):
                nn.init.zeros_(branch_out.weight)
                nn.init.zeros_(branch_out.bias)

    @property
    def dim(self) -> int:
        return self.cfg.dim

    def forward(self, text: TextBatch) -> torch.Tensor:
        x = self.token_embed(text.ids) + self.position_embed(text.positions)
        for block in self.blocks:
            x = block(x, text.cu_seqlens, text.max_len)
        return self.norm(x)


class PretrainedTextEncoder:
    """A frozen transformers T5 / UMT5 encoder and its tokenizer, from a local directory (no hub access).

    Runs outside the trained model, under no_grad; its packed embeddings feed the DiT's cross-attention.
    """

    def __init__(self, path: str, max_tokens: int, tokenizer_path: Optional[str] = None, pad_to: Optional[int] = None,
                 dtype: str = "auto"):
        from transformers import AutoConfig, AutoTokenizer, T5EncoderModel, UMT5EncoderModel

        config = AutoConfig.from_pretrained(path, local_files_only=True)
        classes = {"t5": T5EncoderModel, "umt5": UMT5EncoderModel, "mt5": T5EncoderModel}
        if config.model_type not in classes:
            raise ValueError(f"{path}: a {config.model_type!r} model is not a T5/UMT5 encoder")
        self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_path or path, local_files_only=True)
        self.pad_to = pad_to
        self.network = classes[config.model_type].from_pretrained(path, local_files_only=True).eval()
        self.network.requires_grad_(False)
        self.dim = config.d_model
        self.max_tokens = max_tokens
        self.dtype = dtype  # model.text.dtype: decided where the encoder is placed (`to`)
        self.device = torch.device("cpu")
        self.network.to(frozen_dtype(dtype, "cpu"))

    def to(self, device) -> "PretrainedTextEncoder":
        self.device = torch.device(device)
        self.network.to(device=self.device, dtype=frozen_dtype(self.dtype, self.device.type))
        return self

    @torch.no_grad()
    def batch(self, captions: Sequence[str], device=None) -> TextBatch:
        tokens = self.tokenizer(list(captions), padding=True, truncation=True, max_length=self.max_tokens,
                                return_tensors="pt")
        host_mask = tokens["attention_mask"]  # lengths and the packing index are read on the host: no device sync
        mask = to_device(host_mask, self.device)
        hidden = self.network(input_ids=to_device(tokens["input_ids"], self.device), attention_mask=mask).last_hidden_state
        lengths = host_mask.sum(dim=1).tolist()
        real = to_device(host_mask.flatten().nonzero().flatten(), self.device)
        packed = hidden.flatten(0, 1).index_select(0, real)  # (M, dim), each caption's real tokens only
        if self.pad_to:  # each caption's real tokens, then zero vectors up to pad_to, as Wan was trained
            pieces = torch.split(packed, lengths)
            packed = torch.cat([torch.cat([p, p.new_zeros(self.pad_to - len(p), p.shape[1])]) for p in pieces])
            lengths = [self.pad_to] * len(lengths)
        device = device or self.device
        return TextBatch(None, None, cu_seqlens_from_lengths(lengths, device), max(lengths), lengths,
                         embeddings=packed.float().to(device))


def pretrained_text_dim(path: str) -> int:
    """The encoder's width, read from its config.json without loading weights."""
    return int(json.loads((Path(path) / "config.json").read_text())["d_model"])
