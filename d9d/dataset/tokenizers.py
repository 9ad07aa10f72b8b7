"""Tokenizers for training: a built-in byte-level one and local HF ``tokenizer.json`` files.

The byte-level tokenizer needs nothing downloaded: ids 0-255 are the UTF-8 bytes, then
come the specials (``<|endoftext|>`` = 256 separates documents, ``<|pad|>`` = 257).
An HF tokenizer is read from a local ``tokenizer.json`` (every Qwen3 checkpoint folder
has one) through the ``tokenizers`` library.
"""

import json
from pathlib import Path
from typing import Protocol


class Tokenizer(Protocol):
    """What the data pipeline needs from a tokenizer.

    Attributes:
        vocab_size: Number of ids (the model's vocabulary must be at least this).
        eos_id: The id appended after each document.
        pad_id: The id filling unused slots of packed rows.
        name: Identifies the tokenizer in cache keys and messages.
    """

    vocab_size: int
    eos_id: int
    pad_id: int
    name: str

    def encode(self, text: str) -> list[int]:
        """The ids of ``text`` (no specials added)."""
        ...

    def decode(self, ids: list[int]) -> str:
        """The text of ``ids`` (specials dropped)."""
        ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0-255, then ``<|endoftext|>`` (256) and ``<|pad|>`` (257)."""

    SPECIALS = ("<|endoftext|>", "<|pad|>")

    def __init__(self):
        """Builds the tokenizer (it has no state)."""
        self.vocab_size = 256 + len(self.SPECIALS)
        self.eos_id = 256
        self.pad_id = 257
        self.name = "byte"

    def encode(self, text: str) -> list[int]:
        """The UTF-8 bytes of ``text`` (invalid surrogates replaced)."""
        return list(text.encode("utf-8", errors="replace"))

    def decode(self, ids: list[int]) -> str:
        """The text of the byte ids (specials dropped, invalid UTF-8 replaced)."""
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


# Common end-of-document tokens, tried in order when tokenizer_config.json names none.
_EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>")


class HFTokenizer:
    """A local HF ``tokenizer.json`` through the ``tokenizers`` library."""

    def __init__(self, path: str | Path):
        """Loads the tokenizer.

        Args:
            path: ``tokenizer.json`` or the folder holding it. The end-of-document token
                is ``eos_token`` of a ``tokenizer_config.json`` beside it, else the first
                of ``<|endoftext|>``, ``</s>``, ``<|end_of_text|>``, ``<eos>`` it knows.

        Raises:
            ImportError: If ``tokenizers`` is not installed.
            ValueError: If the file is missing or no end-of-document token is found.
        """
        try:
            from tokenizers import Tokenizer as _HF
        except ImportError as err:
            raise ImportError(
                "an HF tokenizer.json needs the 'tokenizers' package: pip install tokenizers"
            ) from err
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise ValueError(f"tokenizer file {file} does not exist")
        self._tok = _HF.from_file(str(file))
        self.name = f"hf:{file.resolve()}"
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        candidates = list(_EOS_CANDIDATES)
        config = file.parent / "tokenizer_config.json"
        if config.is_file():
            eos = json.loads(config.read_text()).get("eos_token")
            if isinstance(eos, dict):
                eos = eos.get("content")
            if eos:
                candidates.insert(0, eos)
        ids = [self._tok.token_to_id(token) for token in candidates]
        found = [i for i in ids if i is not None]
        if not found:
            raise ValueError(
                f"{file}: no end-of-document token found (tried {candidates}); set data.eos_id"
            )
        self.eos_id = found[0]
        pad = self._tok.token_to_id("<|pad|>") or self._tok.token_to_id("<pad>")
        # Padding slots carry the label -100, so any id works; eos keeps the vocab small.
        self.pad_id = pad if pad is not None else self.eos_id

    def encode(self, text: str) -> list[int]:
        """The ids of ``text`` without added special tokens."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        """The text of ``ids``, special tokens skipped."""
        return self._tok.decode(ids, skip_special_tokens=True)


def load_tokenizer(spec: str) -> Tokenizer:
    """``"byte"`` gives :class:`ByteTokenizer`; anything else is an HF tokenizer path."""
    if spec == "byte":
        return ByteTokenizer()
    return HFTokenizer(spec)
