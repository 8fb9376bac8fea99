#!/usr/bin/env python3
"""Build sinklora_ext/data/longalpaca_sample.json: a small LongAlpaca-format data set
({"instruction", "input", "output"}) made from real text, the Debian Reference
(Debian package debian-reference-en; install it with scripts/install_data.sh).

Every section of the manual that has at least two subsections and 2,500 characters becomes one
item (a few hundred to ~6k tokens of input); the item types cycle through three tasks whose answers
are taken from the text itself:

* title:       input = the section without its heading;   output = the section's title
* subsections: input = the section with its subsections;  output = the subsection headings, in order
* lead:        input = the section with its subsections;  output = the first sentence of each subsection

Deterministic: the same package version gives the same file.

    python scripts/make_longalpaca_sample.py [--output PATH] [--min-chars 2500]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sinklora_ext.data import Section, _blocks_to_text, corpus_sections  # noqa: E402

NUMBER = re.compile(r"^(?:[A-Z]|\d+)(?:\.\d+)*\.\s+")
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"“(])")

INSTRUCTIONS = {
    "title": "What is the title of the following section of the Debian Reference? Answer with the title only.",
    "subsections": "List the titles of the subsections of the following section of the Debian Reference, "
                   "one per line, in the order in which they appear.",
    "lead": "Summarize the following section of the Debian Reference by quoting the first sentence of each "
            "of its subsections, one per line.",
}


def strip_number(title: str) -> str:
    return NUMBER.sub("", title).strip()


def first_sentence(section: Section) -> str | None:
    for block in section.blocks:
        if block.kind == "para":
            return SENTENCE_END.split(block.text, maxsplit=1)[0].strip()
    return None


def groups(sections: list[Section]) -> list[list[Section]]:
    """Each level <= 2 section with the deeper sections that follow it."""
    out: list[list[Section]] = []
    for s in sections:
        if s.level <= 2:
            out.append([s])
        elif out:
            out[-1].append(s)
    return out


def render(group: list[Section], with_heading: bool) -> str:
    parts = [group[0].title] if with_heading else []
    if group[0].blocks:
        parts.append(_blocks_to_text(group[0].blocks))
    for sub in group[1:]:
        parts.append(sub.title)
        if sub.blocks:
            parts.append(_blocks_to_text(sub.blocks))
    return "\n\n".join(parts)


def build(min_chars: int) -> list[dict]:
    items = []
    eligible = [g for g in groups(corpus_sections("debian-reference"))
                if len(g) >= 3 and len(render(g, True)) >= min_chars]
    kinds = list(INSTRUCTIONS)
    for i, g in enumerate(eligible):
        kind = kinds[i % len(kinds)]
        body = render(g, with_heading=False)
        if kind == "title":
            output = strip_number(g[0].title)
        elif kind == "subsections":
            output = "\n".join(sub.title for sub in g[1:])
        else:
            leads = [first_sentence(sub) for sub in g[1:]]
            leads = [s for s in leads if s]
            if len(leads) < 2:
                kind, output = "title", strip_number(g[0].title)
            else:
                output = "\n".join(leads)
        items.append({"instruction": INSTRUCTIONS[kind], "input": body, "output": output})
    return items


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=ROOT / "sinklora_ext" / "data" / "longalpaca_sample.json")
    parser.add_argument("--min-chars", type=int, default=2500)
    args = parser.parse_args()
    items = build(args.min_chars)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.output.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(items, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(args.output)
    chars = sum(len(x["input"]) for x in items)
    print(f"wrote {len(items)} items ({chars} input characters) to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
