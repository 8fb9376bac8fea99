"""Real text and datasets (docs/training.md; token rule in docs/cli.md).

* Long real English text comes from Debian documentation packages that the project installs itself
  (``scripts/install_data.sh``). :func:`debian_text_file` turns a package's HTML manual into one
  UTF-8 ``.txt`` file (stdlib ``html.parser``; navigation, tables of contents and data tables are
  dropped, prose, lists and code blocks kept), built once and cached atomically under the cache
  directory (``$SINKLORA_CACHE``, default ``~/.cache/sinklora_ext``).
* :func:`tokenize_file`: the tokens of a text file, ``tokenizer(text).input_ids`` (docs/cli.md).
* :class:`PackedTextDataset`: plain text files as consecutive non-overlapping windows of ``context``
  tokens (``labels = input_ids``).
* :class:`LongAlpacaDataset`: LongAlpaca-format JSON (``instruction``, ``input``, ``output``); loss
  on the output only. :func:`collate_batch` right-pads a batch (``labels`` -100 on padding) and adds
  the ``attention_mask``.
* :func:`longalpaca_sample_path`: a small LongAlpaca-format sample made from the Debian Reference,
  shipped with the package (built by ``scripts/make_longalpaca_sample.py``).
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from dataclasses import dataclass, field
from html.parser import HTMLParser
from importlib import resources
from pathlib import Path
from typing import Iterable, Sequence

import torch
from torch.utils.data import Dataset

from .hf.models import cache_dir
from .usage import MissingInput, UsageError, read_json_file, read_text_file

IGNORE_INDEX = -100
CONVERTER_VERSION = 1  # bump when the HTML -> text conversion changes (invalidates cached corpora)

__all__ = [
    "CORPORA",
    "DEFAULT_CORPUS",
    "IGNORE_INDEX",
    "Corpus",
    "Section",
    "MissingTextData",
    "html_to_blocks",
    "html_to_text",
    "corpus_sections",
    "debian_text_file",
    "resolve_text_path",
    "tokenize_file",
    "PackedTextDataset",
    "LongAlpacaDataset",
    "load_longalpaca_items",
    "format_prompt",
    "PadCollator",
    "collate_batch",
    "longalpaca_sample_path",
]


# --------------------------------------------------------------------------------------------
# Debian documentation corpora
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Corpus:
    name: str
    apt_package: str
    root: str
    files: tuple[str, ...]  # HTML files, in reading order
    title: str


CORPORA: dict[str, Corpus] = {
    c.name: c
    for c in (
        Corpus(
            "debian-reference",
            "debian-reference-en",
            "/usr/share/debian-reference",
            ("pr01.en.html",) + tuple(f"ch{i:02d}.en.html" for i in range(1, 13)) + ("apa.en.html",),
            "Debian Reference (Osamu Aoki)",
        ),
        Corpus(
            "gnu-standards",
            "gnu-standards",
            "/usr/share/doc/gnu-standards",
            ("standards.html", "maintain.html"),
            "GNU Coding Standards and Information for Maintainers of GNU Software",
        ),
        Corpus(
            "bash-reference",
            "bash-doc",
            "/usr/share/doc/bash",
            ("bashref.html",),
            "Bash Reference Manual",
        ),
    )
}
DEFAULT_CORPUS = "debian-reference"


class MissingTextData(MissingInput):
    """A Debian documentation package is not installed."""


_BLOCK_TAGS = {
    "p", "div", "section", "article", "blockquote", "li", "dt", "dd", "ul", "ol", "dl", "br", "hr",
    "h1", "h2", "h3", "h4", "h5", "h6", "pre", "table", "tr", "caption", "figure", "body", "title",
}
_HEADINGS = {"h1": 1, "h2": 2, "h3": 3, "h4": 4, "h5": 5, "h6": 6}
_SKIP_TAGS = {"head", "script", "style", "table", "nav", "img"}
# DocBook (debian-reference) and Texinfo (gnu-standards, bash-doc) navigation and indexes.
_SKIP_CLASSES = {
    "navheader", "navfooter", "toc", "list-of-tables", "list-of-figures", "list-of-examples",
    "header", "nav-panel", "contents", "shortcontents", "short-toc", "table", "informaltable",
    "mediaobject", "index-entry-id", "printindex",
}
_VOID = {"br", "hr", "img", "meta", "link", "input", "area", "base", "col", "embed", "source", "wbr"}


@dataclass
class Block:
    kind: str  # "heading", "para", "item", "pre"
    text: str
    level: int = 0


class _TextExtractor(HTMLParser):
    """HTML -> list of :class:`Block` (headings, paragraphs, list items, preformatted text)."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.blocks: list[Block] = []
        self._stack: list[tuple[str, bool]] = []  # (tag, starts a skipped region)
        self._skip = 0
        self._pre = 0
        self._buf: list[str] = []
        self._kind = "para"
        self._level = 0
        self._item = False

    # -- helpers
    def _flush(self):
        raw = "".join(self._buf)
        self._buf = []
        if self._pre:
            text = raw.strip("\n")
            kind = "pre"
        else:
            text = re.sub(r"\s+", " ", raw).strip()
            kind = self._kind
            if kind == "para" and self._item and text:
                kind = "item"  # the first paragraph of a list item
        if text:
            self.blocks.append(Block(kind, text, self._level if kind == "heading" else 0))
            self._item = False
        self._kind, self._level = "para", 0

    def _skips(self, tag, attrs) -> bool:
        if tag in _SKIP_TAGS:
            return True
        classes = set((dict(attrs).get("class") or "").split())
        return bool(classes & _SKIP_CLASSES)

    # -- parser callbacks
    def handle_starttag(self, tag, attrs):
        skip = self._skips(tag, attrs)
        if tag not in _VOID:
            self._stack.append((tag, skip))
        if skip:
            self._skip += 1
            if tag in _VOID:
                self._skip -= 1
            return
        if self._skip:
            return
        if tag in _BLOCK_TAGS and not self._pre:
            self._flush()
        if tag == "pre":
            self._pre += 1
        elif tag in _HEADINGS and not self._pre:
            self._kind, self._level = "heading", _HEADINGS[tag]
        elif tag in ("li", "dt") and not self._pre:
            self._item = True
        elif tag == "br" and self._pre:
            self._buf.append("\n")

    def handle_startendtag(self, tag, attrs):
        # XHTML <br/>, <a id="..."/>: never opens an element
        if self._skip or self._skips(tag, attrs):
            return
        if tag in ("br", "hr") and not self._pre:
            self._flush()

    def handle_endtag(self, tag):
        # pop to the matching open tag (tolerates unclosed <p>, <li>, ...)
        if not any(t == tag for t, _ in self._stack):
            return
        while self._stack:
            t, skip = self._stack.pop()
            if skip:
                self._skip -= 1
            elif not self._skip:
                if t == "pre":
                    self._flush()
                    self._pre -= 1
                elif t in _BLOCK_TAGS and not self._pre:
                    self._flush()
            if t == tag:
                break

    def handle_data(self, data):
        if not self._skip:
            self._buf.append(data)

    def close(self):
        super().close()
        if not self._skip:
            self._flush()


def html_to_blocks(html: str) -> list[Block]:
    parser = _TextExtractor()
    parser.feed(html)
    parser.close()
    return parser.blocks


def _blocks_to_text(blocks: Iterable[Block]) -> str:
    out = []
    for b in blocks:
        out.append(f"- {b.text}" if b.kind == "item" else b.text)
    return "\n\n".join(out)


def html_to_text(html: str) -> str:
    """Plain text of an HTML page: headings and paragraphs separated by blank lines, list items as
    ``- item``, ``<pre>`` kept verbatim; head, scripts, navigation, tables of contents and data
    tables dropped."""
    return _blocks_to_text(html_to_blocks(html))


@dataclass
class Section:
    """A heading and the blocks up to the next heading."""

    title: str
    level: int
    source: str
    blocks: list[Block] = field(default_factory=list)

    @property
    def text(self) -> str:
        return _blocks_to_text(self.blocks)


def _corpus(name: str) -> Corpus:
    if name not in CORPORA:
        raise ValueError(f"text corpus must be one of {sorted(CORPORA)}, got {name!r}")
    return CORPORA[name]


def _source_files(corpus: Corpus) -> list[Path]:
    root = Path(corpus.root)
    paths = [root / f for f in corpus.files]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise MissingTextData(
            f"the text corpus {corpus.name!r} needs the Debian package {corpus.apt_package!r}: "
            f"run `sudo apt-get install {corpus.apt_package}` (or scripts/install_data.sh); "
            f"missing {missing[0]}"
            + (" -- if the package is installed, dpkg may exclude /usr/share/doc "
               "(see /etc/dpkg/dpkg.cfg.d/)" if corpus.root.startswith("/usr/share/doc") else "")
        )
    return paths


def corpus_sections(name: str = DEFAULT_CORPUS) -> list[Section]:
    """The corpus split at its headings (for building sample datasets)."""
    sections: list[Section] = []
    for path in _source_files(_corpus(name)):
        current = None
        for block in html_to_blocks(path.read_text(encoding="utf-8", errors="replace")):
            if block.kind == "heading":
                current = Section(block.text, block.level, path.name)
                sections.append(current)
            elif current is not None:
                current.blocks.append(block)
    return sections


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def debian_text_file(name: str = DEFAULT_CORPUS) -> Path:
    """A UTF-8 text file with the whole manual of a Debian documentation package.

    ``name`` is one of :data:`CORPORA` (default ``"debian-reference"``: the Debian Reference,
    package ``debian-reference-en``, about 120k words). Built from the installed HTML once and
    cached under ``$SINKLORA_CACHE/text/`` (rebuilt when the package's files change); raises
    :class:`MissingTextData` naming the apt package when it is not installed.
    """
    corpus = _corpus(name)
    paths = _source_files(corpus)
    h = hashlib.sha256(f"v{CONVERTER_VERSION}".encode())
    for p in paths:
        st = p.stat()
        h.update(f"{p}:{st.st_size}:{st.st_mtime_ns}".encode())
    out = cache_dir() / "text" / f"{name}-{h.hexdigest()[:12]}.txt"
    if not out.is_file():
        parts = [html_to_text(p.read_text(encoding="utf-8", errors="replace")) for p in paths]
        _atomic_write_text(out, "\n\n".join(part for part in parts if part) + "\n")
    return out


def resolve_text_path(text: str | os.PathLike, argument: str = "--text") -> Path:
    """A text file path, or the name of a Debian corpus (see :data:`CORPORA`). The file must be
    non-empty UTF-8 text (:func:`~sinklora_ext.usage.read_text_file`)."""
    p = Path(text).expanduser()
    if not p.exists() and str(text) in CORPORA:
        return debian_text_file(str(text))
    if not p.exists():
        raise MissingInput(f"{argument}: no such file {str(text)!r} (nor a corpus name: {sorted(CORPORA)})")
    read_text_file(p, argument)
    return p


# --------------------------------------------------------------------------------------------
# Tokens and datasets
# --------------------------------------------------------------------------------------------


def tokenize_file(tokenizer, path: str | os.PathLike) -> torch.Tensor:
    """Tokens of a UTF-8 text file: ``tokenizer(text).input_ids`` (the tokenizer's default special
    tokens), as a 1-D LongTensor."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"{path} is not UTF-8 text (offset {e.start})") from None
    # verbose=False: no "longer than the maximum sequence length" warning for a whole book
    ids = tokenizer(text, verbose=False).input_ids
    return torch.tensor(ids, dtype=torch.long)


class PackedTextDataset(Dataset):
    """Plain text files packed into consecutive non-overlapping windows of ``context`` tokens.

    The files' tokens (:func:`tokenize_file`) are concatenated in order and cut into
    ``len // context`` windows from the start (a partial last window is dropped); each item is
    ``{"input_ids": [context], "labels": [context]}`` with ``labels == input_ids`` (the model shifts).
    """

    def __init__(self, tokenizer, paths: str | os.PathLike | Sequence[str | os.PathLike], context: int,
                 max_windows: int | None = None):
        if context < 2:
            raise ValueError(f"context must be >= 2 tokens, got {context}")
        if isinstance(paths, (str, os.PathLike)):
            paths = [paths]
        if not paths:
            raise ValueError("PackedTextDataset needs at least one text file")
        self.paths = [Path(p) for p in paths]
        tokens = [tokenize_file(tokenizer, p) for p in self.paths]
        self.tokens = torch.cat(tokens) if len(tokens) > 1 else tokens[0]
        self.context = context
        n = self.tokens.numel() // context
        self.num_windows = n if max_windows is None else min(n, max_windows)

    def __len__(self) -> int:
        return self.num_windows

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not -self.num_windows <= i < self.num_windows:
            raise IndexError(f"window {i} out of range ({self.num_windows} windows)")
        i %= self.num_windows
        window = self.tokens[i * self.context:(i + 1) * self.context]
        return {"input_ids": window.clone(), "labels": window.clone()}


# LongLoRA's (Alpaca's) prompts for supervised fine-tuning.
PROMPT_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)


def format_prompt(item: dict) -> str:
    """The prompt of a LongAlpaca item: its instruction and (when not empty) its input."""
    if item.get("input"):
        return PROMPT_INPUT.format(instruction=item["instruction"], input=item["input"])
    return PROMPT_NO_INPUT.format(instruction=item["instruction"])


def load_longalpaca_items(source, argument: str = "--data") -> list[dict]:
    """The items of a LongAlpaca JSON file (or of a list), checked: a JSON list of objects with
    string ``instruction`` and ``output`` (and ``input``, when there is one)."""
    if isinstance(source, (str, os.PathLike)):
        items, where = read_json_file(source, argument), f"{argument}: {source}"
    else:
        items, where = list(source), "items"
    if not isinstance(items, list):
        raise UsageError(f"{where}: a LongAlpaca file is a JSON list of objects, got {type(items).__name__}")
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise UsageError(f"{where}[{i}]: expected an object with instruction/input/output")
        for key in ("instruction", "output"):
            if not isinstance(item.get(key), str):
                raise UsageError(f"{where}[{i}]: missing or non-string {key!r}")
        if not isinstance(item.get("input", ""), str):
            raise UsageError(f"{where}[{i}]: 'input' must be a string")
    return items


class LongAlpacaDataset(Dataset):
    """LongAlpaca-format instruction data: a JSON list of ``{"instruction", "input", "output"}``.

    Each item is the prompt (:func:`format_prompt`, tokenized with the tokenizer's default special
    tokens) followed by the output and the EOS token; ``labels`` are -100 on the prompt, so the loss
    is on the output (and EOS) only. Items longer than ``context`` tokens are truncated:
    ``truncation="middle"`` (default) keeps the output (up to half the context) and cuts the middle
    of the prompt, so the instruction and the ``### Response:`` marker survive; ``"right"`` cuts
    the end of the sequence, as LongLoRA does.
    """

    def __init__(self, tokenizer, source, context: int, truncation: str = "middle"):
        if context < 2:
            raise ValueError(f"context must be >= 2 tokens, got {context}")
        if truncation not in ("middle", "right"):
            raise ValueError(f"truncation must be 'middle' or 'right', got {truncation!r}")
        self.items = load_longalpaca_items(source)
        self.tokenizer = tokenizer
        self.context = context
        self.truncation = truncation
        self.eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    def __len__(self) -> int:
        return len(self.items)

    def encode(self, item: dict) -> tuple[list[int], list[int]]:
        prompt = self.tokenizer(format_prompt(item), verbose=False).input_ids
        target = self.tokenizer(item["output"], add_special_tokens=False, verbose=False).input_ids + self.eos
        n = self.context
        if len(prompt) + len(target) > n:
            if self.truncation == "right":
                prompt = prompt[:n]
                target = target[: n - len(prompt)]
            else:
                target = target[: max(n // 2, n - len(prompt))]
                keep = n - len(target)
                head = (keep + 1) // 2
                prompt = prompt[:head] + (prompt[len(prompt) - (keep - head):] if keep - head else [])
        return prompt, target

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        prompt, target = self.encode(self.items[i])
        input_ids = torch.tensor(prompt + target, dtype=torch.long)
        labels = input_ids.clone()
        labels[: len(prompt)] = IGNORE_INDEX
        return {"input_ids": input_ids, "labels": labels}


class PadCollator:
    """Right-pads ``input_ids`` with the pad token and ``labels`` with -100; adds ``attention_mask``
    (1 on tokens, 0 on padding). Features without ``labels`` get ``labels = input_ids``."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        self.pad_token_id = int(pad_token_id)
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: Sequence[dict]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("cannot collate an empty batch")
        ids = [torch.as_tensor(f["input_ids"], dtype=torch.long) for f in features]
        labels = [torch.as_tensor(f.get("labels", f["input_ids"]), dtype=torch.long) for f in features]
        width = max(t.numel() for t in ids)
        m = self.pad_to_multiple_of
        if m:
            width = -(-width // m) * m
        batch_ids = torch.full((len(ids), width), self.pad_token_id, dtype=torch.long)
        batch_labels = torch.full((len(ids), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(ids), width), dtype=torch.long)
        for row, (x, y) in enumerate(zip(ids, labels, strict=True)):
            if x.shape != y.shape:
                raise ValueError(f"feature {row}: labels shape {tuple(y.shape)} != input_ids shape {tuple(x.shape)}")
            batch_ids[row, : x.numel()] = x
            batch_labels[row, : y.numel()] = y
            mask[row, : x.numel()] = 1
        return {"input_ids": batch_ids, "labels": batch_labels, "attention_mask": mask}


def collate_batch(tokenizer_or_pad_id, pad_to_multiple_of: int | None = None) -> PadCollator:
    """The collate function for :class:`PackedTextDataset` / :class:`LongAlpacaDataset` batches:
    ``DataLoader(ds, collate_fn=collate_batch(tokenizer))``. Pads with the tokenizer's pad token
    (its EOS token when it has none)."""
    if isinstance(tokenizer_or_pad_id, int):
        pad = tokenizer_or_pad_id
    else:
        tok = tokenizer_or_pad_id
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        if pad is None:
            raise ValueError("the tokenizer has neither a pad nor an EOS token; pass a pad id")
    return PadCollator(pad, pad_to_multiple_of)


def longalpaca_sample_path() -> Path:
    """The LongAlpaca-format sample shipped with the package (made from the Debian Reference)."""
    path = resources.files("sinklora_ext") / "samples" / "longalpaca_sample.json"
    return Path(str(path))
