"""Rebuilds src/moe_data/corpora/kjv.txt.gz from Debian's bible-kjv package (not run by tests).

    apt-get install bible-kjv          # brings bible-kjv-text, the text in its own compressed format
    bible -l100000 "Genesis 1:1-Revelation 22:21" > kjv-full.txt
    python packages/data/tools/make_kjv_corpus.py kjv-full.txt

Keeps 18 books (the Law and Ruth, the poetic books, the Gospels and Acts; about 2.1 MB), one verse
per line as "N text", a "Book N" heading and a blank line before each chapter.
"""

import gzip
import re
import sys
from pathlib import Path

BOOKS = {
    "Genesis", "Exodus", "Leviticus", "Numbers", "Deuteronomy", "Joshua", "Judges", "Ruth",
    "Job", "Psalms", "Proverbs", "Ecclesiastes", "Song of Solomon",
    "Matthew", "Mark", "Luke", "John", "Acts",
}  # fmt: skip
OUT = Path(__file__).resolve().parents[1] / "src" / "moe_data" / "corpora" / "kjv.txt.gz"


def main(full_text: str) -> None:
    kept, book = [], None
    for line in Path(full_text).read_text().split("\n"):
        heading = re.fullmatch(r"(\S.*) (\d+)", line)
        if heading:
            book = heading.group(1)
        if book in BOOKS:
            kept.append(line.strip())
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(kept).strip("\n") + "\n")
    with gzip.GzipFile(OUT, "wb", mtime=0) as f:
        f.write(text.encode())
    print(f"{OUT}: {len(text):,} characters")


if __name__ == "__main__":
    main(sys.argv[1])
