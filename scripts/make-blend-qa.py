#!/usr/bin/env python3
"""Builds data/blend-qa.jsonl, the RAG question set of `kvplugin eval blend-qa` and
`kvplugin bench blend`, from real English text that ships with Python: the language reference
topics in `pydoc_data/topics.py` (this file was built from CPython 3.11.7's copy).

Each topic's text is cut at a line break to about 2,000 characters (about 512 SmolLM2 tokens).
A question comes from the first definitional sentence of a topic ("X is/are Y"): "What is X?",
answer "Y". Each item holds six documents: the question's topic at a random position among five
other random topics. Seeded, so a rerun on the same Python gives the same file.

Usage: python3 scripts/make-blend-qa.py [N_ITEMS] > data/blend-qa.jsonl
"""
import json
import random
import re
import sys

import pydoc_data.topics as topics

CHARS = 2000
DOCS = 6


def cut(text: str) -> str:
    if len(text) <= CHARS:
        return text.strip()
    end = text.rfind("\n", 0, CHARS)
    return text[: end if end > CHARS // 2 else CHARS].strip()


DEFINITION = re.compile(
    r"(?:^|(?<=[.:]) )(?P<subj>(?:The |A |An )?[A-Za-z\"_\-]+(?: [A-Za-z\"_\-]+){0,5}) "
    r"(?P<verb>is|are) (?P<pred>(?!not\b|also\b|only\b)[a-z\"][^.:;]{8,110})[.:]"
)
VAGUE = {"if", "when", "that", "it", "so", "note", "for", "some", "these", "this", "anything",
         "which", "there", "they", "here", "such", "its", "each", "what", "where", "all", "unless"}


def questions(doc: str):
    """Every "X is/are Y." sentence of `doc` whose X is a plain noun phrase, as (question, answer)."""
    flat = re.sub(r"\s+", " ", doc)
    for m in DEFINITION.finditer(flat):
        subj, pred = m.group("subj").strip(), m.group("pred").strip()
        words = {w.strip('"').lower() for w in subj.split()}
        if words & VAGUE:
            continue
        if len(subj) < 4 or subj.count('"') % 2 or subj[0].islower():
            continue
        subj = subj if subj.startswith('"') else subj[0].lower() + subj[1:]
        yield f"What {m.group('verb')} {subj}?", pred


def main() -> None:
    n_items = int(sys.argv[1]) if len(sys.argv) > 1 else 24
    rng = random.Random(7)
    docs = {name: cut(text) for name, text in sorted(topics.topics.items()) if len(text) > 1200}
    # One question per topic: its first definitional sentence.
    asked = [(name, qs[0]) for name, doc in docs.items() if (qs := list(questions(doc)))]
    rng.shuffle(asked)
    names = sorted(docs)
    for i in range(n_items):
        name, (q, answer) = asked[i % len(asked)]
        others = rng.sample([n for n in names if n != name], DOCS - 1)
        chunks = others[:]
        chunks.insert(rng.randrange(DOCS), name)
        item = {
            "id": f"pydoc-{i:03d}-{name}",
            "chunks": [docs[c] for c in chunks],
            "question": q,
            "answers": [answer],
        }
        print(json.dumps(item, ensure_ascii=False))


if __name__ == "__main__":
    main()
