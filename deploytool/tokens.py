"""Token streams for language models: ids from a file, windows of `seq_len`, next-token labels.

A stream is a 1-D array of token ids (and an optional mask of the tokens whose prediction counts):

- `.npz`: arrays `ids` (1-D integers) and optionally `mask` (1-D, same length; 0 = not a target);
- `.npy`: a 1-D integer array, opened by memory map (never loaded whole);
- `.bin`: raw little-endian uint16 ids (nanoGPT's format), by memory map;
- anything else is text: tokenised by the model folder's tokenizer when it has one (the text is then
  read whole, up to MAX_TEXT_BYTES), else its bytes are the tokens (vocabulary 256, by memory map).

Training reads random windows of `seq_len + 1` tokens, evaluation evenly spaced windows up to a token
bound, so what is read per step is bounded whatever the corpus' size. Labels are the inputs shifted by
one token, IGNORE where the mask says a token is not a target.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from deploytool.errors import BadInput

#: a byte-level stream's vocabulary
BYTE_VOCAB = 256
#: the label cross-entropy skips (torch's default ignore_index)
IGNORE = -100
#: the largest text file tokenised with a tokenizer (read whole); bigger corpora: save ids as .npy
MAX_TEXT_BYTES = 1 << 28
#: the largest .npz stream (read whole); bigger: .npy or .bin, read by memory map
MAX_NPZ_TOKENS = 1 << 27
#: the longest window
MAX_SEQ_LEN = 1 << 16
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
#: model files (ONNX, weights, TensorRT engines), never token data: their bytes would read as a "text"
MODEL_SUFFIXES = (".onnx", ".safetensors", ".plan", ".engine")


@dataclass
class TokenStream:
    """Token ids and what they are.

    Attributes:
        name: what the stream is, named in metrics ("last 10% of tokens of corpus.bin").
        ids: 1-D integer ids (possibly a read-only memory map).
        mask: 1-D, non-zero where a token is a prediction target; None: every token is.
        vocab: the vocabulary the ids come from (256 for bytes, a tokenizer's size), None if unknown.
    """

    name: str
    ids: Any
    mask: Any = None
    vocab: int | None = None

    def __len__(self) -> int:
        return int(len(self.ids))

    def part(self, start: int, stop: int, name: str) -> TokenStream:
        """Tokens [start, stop) as a stream named `name` (a view: nothing is read)."""
        return TokenStream(name, self.ids[start:stop], None if self.mask is None else self.mask[start:stop],
                           self.vocab)


def is_token_source(data: Any) -> bool:
    """Whether `data` is language-model data: a TokenStream or a path (not an (x, y) pair)."""
    return isinstance(data, (TokenStream, str, Path))


def has_tokenizer(folder: str | Path | None) -> bool:
    """Whether a model folder holds a tokenizer transformers can load."""
    return folder is not None and Path(folder).is_dir() and any((Path(folder) / f).is_file() for f in TOKENIZER_FILES)


def load_tokens(source: str | Path | TokenStream, *, tokenizer: str | Path | None = None) -> TokenStream:
    """Open a token stream (see the module's docstring for the formats).

    Args:
        source: a .npz, .npy or .bin of ids, a text file, or a TokenStream (returned as is).
        tokenizer: a model folder; its tokenizer tokenises a text file (None or no tokenizer: bytes).

    Returns:
        The TokenStream.

    Raises:
        BadInput: a missing file, a model file (MODEL_SUFFIXES), arrays that are not 1-D integer ids (or a
            mask of another length), negative ids, an empty stream, a text too large to tokenise whole, or a
            tokenizer that fails.
    """
    from deploytool.io import check_file

    if isinstance(source, TokenStream):
        return source
    suffix = Path(source).suffix.lower()
    if suffix in MODEL_SUFFIXES:
        raise BadInput(f"{source} is a model file ({suffix}), not token data: give token ids (.npz, .npy, .bin) "
                       "or a text file")
    path = check_file(source, "token data")
    if suffix == ".npz":
        stream = _load_npz(path)
    elif suffix == ".npy":
        try:
            ids = np.load(path, mmap_mode="r", allow_pickle=False)
        except ValueError as exc:
            raise BadInput(f"{path} is not a readable .npy of token ids: {str(exc).splitlines()[0]}") from exc
        stream = TokenStream(path.name, _check_ids(ids, path))
    elif suffix == ".bin":
        if path.stat().st_size % 2:
            raise BadInput(f"{path}: a .bin of token ids holds little-endian uint16 values (an even number of "
                           f"bytes), got {path.stat().st_size} bytes")
        stream = TokenStream(path.name, np.memmap(path, dtype="<u2", mode="r") if path.stat().st_size else
                             np.zeros(0, np.uint16))
    elif has_tokenizer(tokenizer):
        stream = _tokenise(path, Path(tokenizer))
    else:
        size = path.stat().st_size
        stream = TokenStream(path.name, np.memmap(path, dtype=np.uint8, mode="r") if size else np.zeros(0, np.uint8),
                             vocab=BYTE_VOCAB)
    if len(stream) < 2:
        raise BadInput(f"{path} holds {len(stream)} tokens: a language model needs at least 2 (an input and its "
                       "next token)")
    return stream


def _check_ids(ids: np.ndarray, path: Path) -> np.ndarray:
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise BadInput(f"{path}: token ids must be a 1-D integer array, got {ids.dtype} {list(ids.shape)}")
    return ids


def _load_npz(path: Path) -> TokenStream:
    import zipfile

    try:
        with np.load(path, allow_pickle=False) as npz:
            if "ids" not in npz.files:
                raise BadInput(f"{path} must hold a 1-D array named 'ids' (and optionally 'mask'), found "
                               f"{sorted(npz.files)}")
            ids = npz["ids"]
            if ids.size > MAX_NPZ_TOKENS:
                raise BadInput(f"{path}: {ids.size} ids is more than the {MAX_NPZ_TOKENS} an .npz is read whole "
                               "for; save them as .npy (read by memory map)")
            mask = npz["mask"] if "mask" in npz.files else None
    except BadInput:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise BadInput(f"{path} is not a readable .npz of token ids: {str(exc).splitlines()[0] if str(exc) else exc}"
                       ) from exc
    ids = _check_ids(ids, path)
    if mask is not None and (mask.ndim != 1 or len(mask) != len(ids)):
        raise BadInput(f"{path}: mask must be 1-D with one entry per id ({len(ids)}), got {list(mask.shape)}")
    if len(ids) and int(ids.min()) < 0:
        raise BadInput(f"{path}: token ids must be >= 0, got {int(ids.min())}")
    return TokenStream(path.name, ids, None if mask is None else mask.astype(bool))


def _tokenise(path: Path, folder: Path) -> TokenStream:
    from deploytool.deps import require

    size = path.stat().st_size
    if size > MAX_TEXT_BYTES:
        raise BadInput(f"{path} is {size} bytes, more than the {MAX_TEXT_BYTES} deploytool tokenises at once; "
                       "tokenise it yourself and save the ids as .npy (read by memory map)")
    require("transformers", "tokenising text with a model folder's tokenizer")
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
        text = path.read_text(encoding="utf-8", errors="replace")
        ids = np.asarray(tok(text, add_special_tokens=False)["input_ids"], dtype=np.int64)
    except (OSError, ValueError, KeyError) as exc:
        raise BadInput(f"{folder}: its tokenizer cannot tokenise {path}: {str(exc).splitlines()[0]}") from exc
    return TokenStream(f"{path.name} (tokenised by {folder.name}'s tokenizer)", ids, vocab=len(tok))


def split_tokens(stream: TokenStream, test: str | Path | TokenStream | None, *, test_fraction: float = 0.1,
                 tokenizer: str | Path | None = None) -> tuple[TokenStream, TokenStream]:
    """(train, held-out) streams: `test` when given, else the last `test_fraction` of `stream`.

    Args:
        stream: the training stream.
        test: held-out data (a path or stream), or None.
        test_fraction: the share of `stream` held out when `test` is None (0 < f < 1).
        tokenizer: the model folder whose tokenizer reads a text `test`.

    Returns:
        (train, held_out), the held-out stream named for metrics.

    Raises:
        BadInput: a fraction out of range, or a split that leaves fewer than 2 tokens on a side.
    """
    if test is not None:
        held = load_tokens(test, tokenizer=tokenizer)
        return stream, TokenStream(f"test data {held.name}", held.ids, held.mask, held.vocab)
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)) or not 0 < test_fraction < 1:
        raise BadInput(f"test_fraction must be a number between 0 and 1, got {test_fraction!r}")
    cut = int(round(len(stream) * (1 - test_fraction)))
    if cut < 2 or len(stream) - cut < 2:
        raise BadInput(f"{stream.name}: {len(stream)} tokens cannot be split {1 - test_fraction:.0%} / "
                       f"{test_fraction:.0%} with 2 tokens on each side")
    return (stream.part(0, cut, f"first {1 - test_fraction:.0%} of tokens of {stream.name}"),
            stream.part(cut, len(stream), f"last {test_fraction:.0%} of tokens of {stream.name}"))


def check_seq_len(seq_len: Any) -> int:
    """`seq_len` as a whole number from 1 to MAX_SEQ_LEN.

    Raises:
        BadInput: anything else.
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or not 1 <= seq_len <= MAX_SEQ_LEN:
        raise BadInput(f"seq_len must be a whole number from 1 to {MAX_SEQ_LEN}, got {seq_len!r}")
    return seq_len


def window_batch(stream: TokenStream, starts: np.ndarray, seq_len: int, vocab: int | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Windows of `seq_len` inputs and their next-token labels at `starts`.

    Args:
        stream: the stream.
        starts: window starts (each <= len(stream) - 2); a window shorter than `seq_len` at the end is
            padded with label IGNORE.
        seq_len: tokens per window.
        vocab: the model's vocabulary: an id outside 0..vocab-1 is refused.

    Returns:
        (input ids [B, seq_len] int64, labels [B, seq_len] int64, IGNORE where not a target).

    Raises:
        BadInput: an id outside the vocabulary (the stream named).
    """
    ids = np.zeros((len(starts), seq_len + 1), np.int64)
    valid = np.zeros((len(starts), seq_len + 1), bool)
    for row, start in enumerate(starts):
        chunk = np.asarray(stream.ids[start:start + seq_len + 1], dtype=np.int64)
        ids[row, :len(chunk)] = chunk
        valid[row, :len(chunk)] = True if stream.mask is None else np.asarray(stream.mask[start:start + len(chunk)])
        if stream.mask is not None:
            valid[row, 0] = True
    if vocab is not None and ids.size and (int(ids.max()) >= vocab or int(ids.min()) < 0):
        bad = int(ids.max()) if int(ids.max()) >= vocab else int(ids.min())
        raise BadInput(f"{stream.name}: token id {bad} is outside the model's vocabulary 0..{vocab - 1}")
    labels = np.where(valid[:, 1:], ids[:, 1:], IGNORE)
    return ids[:, :-1], labels


def random_starts(stream: TokenStream, seq_len: int, batch: int, rng: np.random.Generator) -> np.ndarray:
    """`batch` uniformly random window starts (windows of seq_len + 1 tokens that fit the stream)."""
    last = max(len(stream) - seq_len - 1, 0)
    return rng.integers(0, last + 1, size=batch)


def eval_starts(stream: TokenStream, seq_len: int, max_tokens: int) -> np.ndarray:
    """Evenly spaced, non-overlapping window starts covering at most `max_tokens` targets of `stream`."""
    fits = max((len(stream) - 1) // seq_len, 1)
    count = max(min(fits, max_tokens // seq_len), 1)
    return np.linspace(0, max(len(stream) - seq_len - 1, 0), count).astype(np.int64)
