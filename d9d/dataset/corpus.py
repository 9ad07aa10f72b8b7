"""The documents of several token files, indexed globally (the packer's input)."""

import numpy as np
import torch

from d9d.dataset.token_files import TokenFile


class DocumentCorpus:
    """The documents of several token files, indexed globally.

    Attributes:
        files: The token files.
        doc_lengths: Length of every document (eos included), file by file.
    """

    def __init__(self, files: list[TokenFile], max_documents: int | None = None):
        """Indexes the documents of ``files`` (in order), at most ``max_documents``."""
        if not files:
            raise ValueError("no token files given")
        self.files = files
        file_of = np.concatenate([np.full(f.lengths.size, i) for i, f in enumerate(files)])
        start = np.concatenate([f.starts for f in files])
        lengths = np.concatenate([f.lengths for f in files])
        if max_documents is not None:
            file_of, start, lengths = (a[:max_documents] for a in (file_of, start, lengths))
        self._file_of, self._start = file_of, start
        self.doc_lengths = lengths

    def __len__(self) -> int:
        return int(self.doc_lengths.size)

    def split_long_documents(self, max_length: int) -> "DocumentCorpus":
        """The same corpus, with documents longer than ``max_length`` cut into pieces.

        The packer gives a long document's continuation chunks positions that continue
        (a chunk starting 3000 tokens in starts at position 3000), so no document may be
        longer than the model has positions: each piece becomes a document of its own,
        its positions restarting at 0 (the usual truncation to the context length).

        Args:
            max_length: The model's ``max_position_ids``.
        """
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {max_length}")
        pieces = -(-self.doc_lengths // max_length)  # ceil division
        doc = np.repeat(np.arange(self.doc_lengths.size), pieces)
        offset = (np.arange(doc.size) - np.repeat(np.cumsum(pieces) - pieces, pieces)) * max_length
        lengths = np.minimum(self.doc_lengths[doc] - offset, max_length)
        keep = lengths >= 2
        split = object.__new__(DocumentCorpus)
        split.files = self.files
        split._file_of = self._file_of[doc][keep]
        split._start = (self._start[doc] + offset)[keep]
        split.doc_lengths = lengths[keep]
        return split

    def subset(self, indices: np.ndarray) -> "DocumentCorpus":
        """The corpus of the documents ``indices`` (in that order), over the same files."""
        indices = np.asarray(indices, dtype=np.int64)
        chosen = object.__new__(DocumentCorpus)
        chosen.files = self.files
        chosen._file_of = self._file_of[indices]
        chosen._start = self._start[indices]
        chosen.doc_lengths = self.doc_lengths[indices]
        return chosen

    @property
    def num_tokens(self) -> int:
        """Tokens in all documents."""
        return int(self.doc_lengths.sum())

    def max_token_id(self) -> int:
        """The largest id in the files (reads them once)."""
        return max(int(f.tokens.max()) if f.tokens.size else 0 for f in self.files)

    def get_tokens(self, doc_index: int, start: int, length: int) -> torch.Tensor:
        """``length`` ids of document ``doc_index`` from ``start``, as int64."""
        file = self.files[int(self._file_of[doc_index])]
        offset = int(self._start[doc_index]) + start
        return torch.from_numpy(file.tokens[offset : offset + length].astype(np.int64))
