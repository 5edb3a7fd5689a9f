"""Rebuild data/kjv.txt.xz from Debian's bible-kjv-text (the text) and bible-kjv (its reader).

    mkdir /tmp/kjv && cd /tmp/kjv && apt-get download bible-kjv-text bible-kjv
    python data/extract_kjv.py /tmp/kjv          # writes data/kjv.txt.xz

The package stores the text in its own compressed format (/usr/lib/bible.data); the `bible`
program of bible-kjv prints it. Output: one document per chapter ("Genesis 1", then one verse
per line as "N text"), documents separated by a blank line, 1,189 chapters, 31,102 verses.
"""

from __future__ import annotations

import lzma
import re
import subprocess
import sys
import tempfile
from pathlib import Path

VERSE = re.compile(r"^(\S+?)(\d+):(\d+) (.*)$")


def extract(debs_dir: Path) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for deb in sorted(debs_dir.glob("bible-kjv*.deb")):
            subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
        reader = [str(root / "usr/bin/bible"), "-p", str(root / "usr/lib")]
        everything = "Gen1:1-Rev22:21"
        # pretty-printed output carries the books' full names ("Genesis 1" between blank lines)
        pretty = subprocess.run(reader + [everything], capture_output=True, text=True, check=True,
                                stdin=subprocess.DEVNULL).stdout.split("\n")
        plain = subprocess.run(reader + ["-f", everything], capture_output=True, text=True, check=True,
                               stdin=subprocess.DEVNULL).stdout.strip("\n").split("\n")
    titles = [pretty[i] for i in range(1, len(pretty) - 1)
              if pretty[i] and not pretty[i - 1] and not pretty[i + 1] and not pretty[i].startswith(" ")]
    chapters: list[list[str]] = []
    key = None
    for line in plain:  # "Ge1:1 In the beginning ..."
        m = VERSE.match(line)
        if m is None:
            raise ValueError(f"unexpected line from bible: {line!r}")
        if (m[1], m[2]) != key:
            chapters.append([])
            key = (m[1], m[2])
        if int(m[3]) != len(chapters[-1]) + 1:
            raise ValueError(f"verse out of order: {line!r}")
        chapters[-1].append(f"{m[3]} {m[4]}")
    if len(titles) != len(chapters):
        raise ValueError(f"{len(titles)} chapter titles but {len(chapters)} chapters")
    return "\n\n".join(t + "\n" + "\n".join(v) for t, v in zip(titles, chapters)) + "\n"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    text = extract(Path(argv[0]))
    out = Path(__file__).parent / "kjv.txt.xz"
    out.write_bytes(lzma.compress(text.encode("utf-8"), preset=9 | lzma.PRESET_EXTREME))
    print(f"{out}: {len(text.encode())} bytes of text, {text.count(chr(10) + chr(10)) + 1} chapters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
