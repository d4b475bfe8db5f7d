"""Extract the two public-domain corpora of lora_np's text experiments from Debian packages.

Run by hand, never by the tests (it downloads three .deb files with apt-get):

    python lora_np/data/extract_texts.py               # downloads, extracts, writes *.txt.gz here
    python lora_np/data/extract_texts.py --deb-dir D   # reuse .debs already downloaded into D

Nothing is installed: each package is downloaded with ``apt-get download`` into a temporary folder
and unpacked there with ``dpkg-deb -x``; the folder is removed at the end.

* ``austen.txt.gz`` -- Jane Austen's six novels, from ``r-cran-janeaustenr``. The package keeps them
  as R's "lazy-load" data: ``data/Rdata.rdx`` (a gzip-compressed, R-serialised index) maps each
  object name to an (offset, length) slice of ``data/Rdata.rdb``; each slice is a 4-byte big-endian
  uncompressed length followed by a zlib stream, which inflates to one R-serialised object, a
  character vector of the novel's lines. No R is needed: :class:`RReader` below reads the part of
  R's XDR serialisation format that these files use.
* ``kjv.txt.gz`` -- the King James Bible, from ``bible-kjv`` (the ``bible`` program) and
  ``bible-kjv-text`` (its ``bible.data``). The program itself prints the text, which is then
  stripped of chapter and verse numbers.

Both outputs are UTF-8 with ``\\n`` line endings, gzip-compressed with ``mtime=0`` (and no file
name in the header), so a rerun writes byte-identical files. The script prints what it wrote and
exits non-zero on any failure. Standard library only.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import io
import pathlib
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import unicodedata
import zlib

HERE = pathlib.Path(__file__).resolve().parent

PACKAGES = ("r-cran-janeaustenr", "bible-kjv-text", "bible-kjv")

#: janeaustenr's object names and the novels' titles, in publication order.
AUSTEN_NOVELS = (
    ("sensesensibility", "Sense and Sensibility"),
    ("prideprejudice", "Pride and Prejudice"),
    ("mansfieldpark", "Mansfield Park"),
    ("emma", "Emma"),
    ("northangerabbey", "Northanger Abbey"),
    ("persuasion", "Persuasion"),
)

#: the whole Bible, in the reference syntax of the ``bible`` program.
KJV_RANGE = "Gen1:1-Rev22:21"
KJV_BOOKS, KJV_CHAPTERS, KJV_VERSES = 66, 1189, 31102   # the counts of the King James Version

MAX_COMPRESSED_BYTES = 2_000_000


class ExtractionError(RuntimeError):
    """Anything unexpected in the packages or their contents."""


# --------------------------------------------------------------------------------------------
# A reader for the subset of R's serialisation format (XDR, versions 2 and 3) that the
# janeaustenr data uses. Reference: R's src/main/serialize.c (ReadItem).
#
# Every item starts with a 32-bit big-endian "flags" integer:
#   bits 0-7   the SEXP type (below), or one of the special codes >= 238
#   bit  8     "is object" (has a class attribute)
#   bit  9     has attributes  -> an attribute pairlist follows the item's contents
#   bit  10    has a tag       -> (pairlists only) a tag item comes before the CAR
#   bits 12-27 "levels"; for a CHARSXP these carry the string's encoding
# R writes all integers and doubles big-endian (XDR), strings as length + raw bytes.
# --------------------------------------------------------------------------------------------

NILSXP, SYMSXP, LISTSXP, ENVSXP, LANGSXP = 0, 1, 2, 4, 6
CHARSXP, LGLSXP, INTSXP, REALSXP, CPLXSXP, STRSXP = 9, 10, 13, 14, 15, 16
VECSXP, EXPRSXP, RAWSXP = 19, 20, 24
# special codes, written instead of a type for shared or singleton objects
REFSXP, NILVALUE_SXP, GLOBALENV_SXP, UNBOUNDVALUE_SXP, MISSINGARG_SXP = 255, 254, 253, 252, 251
BASENAMESPACE_SXP, EMPTYENV_SXP, BASEENV_SXP = 250, 242, 241
ALTREP_SXP = 238

NA_INTEGER = -(2 ** 31)            # R's NA for integers (and the -1 string length means NA_STRING)
UTF8_MASK, LATIN1_MASK, BYTES_MASK, ASCII_MASK = 1 << 3, 1 << 2, 1 << 1, 1 << 6


class RSymbol(str):
    """An R symbol (a name such as ``names`` or ``class``), kept apart from character strings."""


class RObject:
    """An R value: ``value`` is a Python list (vectors), dict (pairlists) or a singleton marker;
    ``attributes`` is a dict of the R attributes (``names``, ``class``, ``row.names`` ...)."""

    def __init__(self, rtype: int, value, attributes: dict | None = None):
        self.rtype, self.value, self.attributes = rtype, value, attributes or {}

    def __repr__(self):
        size = len(self.value) if hasattr(self.value, "__len__") else "-"
        return f"RObject(type={self.rtype}, len={size}, attributes={sorted(self.attributes)})"


NULL = RObject(NILSXP, None)


class RReader:
    """Unserialise one R object from ``data`` (the bytes of ``serialize()``'s XDR output)."""

    def __init__(self, data: bytes):
        self.buf, self.pos = data, 0
        self.refs: list = []                   # symbols and environments, for REFSXP back-references

    # -- primitive reads -------------------------------------------------------------------
    def _take(self, n: int) -> bytes:
        if self.pos + n > len(self.buf):
            raise ExtractionError(f"R data truncated at byte {self.pos} (wanted {n} more)")
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def int(self) -> int:
        return struct.unpack(">i", self._take(4))[0]

    def length(self) -> int:
        n = self.int()
        if n == -1:                            # a "long vector": two more ints, upper then lower half
            upper, lower = struct.unpack(">II", self._take(8))
            n = (upper << 32) | lower
        return n

    # -- the stream header -----------------------------------------------------------------
    def read(self):
        """Read the header and the one object the stream holds."""
        if self._take(2) != b"X\n":
            raise ExtractionError("not R XDR serialisation (the stream does not start with 'X\\n')")
        version = self.int()
        self.int(), self.int()                 # the writer's R version, the minimal reader version
        if version == 3:
            self._take(self.int())             # the writer's native encoding, e.g. b"UTF-8"
        elif version != 2:
            raise ExtractionError(f"R serialisation version {version} is not supported")
        obj = self.item()
        if self.pos != len(self.buf):
            raise ExtractionError(f"{len(self.buf) - self.pos} bytes left over after the R object")
        return obj

    # -- items -----------------------------------------------------------------------------
    def item(self):
        flags = self.int()
        rtype, levels = flags & 0xFF, flags >> 12
        has_attr, has_tag = bool(flags & (1 << 9)), bool(flags & (1 << 10))

        if rtype == NILVALUE_SXP:
            return NULL
        if rtype in (EMPTYENV_SXP, BASEENV_SXP, GLOBALENV_SXP, UNBOUNDVALUE_SXP, MISSINGARG_SXP,
                     BASENAMESPACE_SXP):
            return RObject(rtype, None)        # singletons: nothing follows in the stream
        if rtype == REFSXP:                    # a back-reference: index packed in the flags, 1-based
            index = flags >> 8 or self.int()
            return self.refs[index - 1]
        if rtype == SYMSXP:                    # a symbol is its name (a CHARSXP), remembered for REFSXP
            sym = RSymbol(self.item())
            self.refs.append(sym)
            return sym
        if rtype == CHARSXP:                   # one string; length -1 is NA_character_
            n = self.int()
            if n == -1:
                return None
            raw = self._take(n)
            if levels & LATIN1_MASK:
                return raw.decode("latin-1")
            if levels & BYTES_MASK:
                raise ExtractionError("a 'bytes'-encoded R string: no text encoding to decode it with")
            return raw.decode("utf-8")         # UTF-8, ASCII, or the writer's native UTF-8
        if rtype in (LISTSXP, LANGSXP):        # a pairlist, or a call (whose tail cells are LISTSXP)
            return self._pairlist(rtype, has_attr, has_tag)
        if rtype == ENVSXP:
            env = RObject(ENVSXP, {})
            self.refs.append(env)              # registered before its contents, which may refer to it
            self.int()                         # locked?
            env.value = {"enclos": self.item(), "frame": self.item(), "hashtab": self.item()}
            env.attributes = self._attributes(self.item())
            return env
        if rtype == ALTREP_SXP:                # e.g. a compact 1:n; expand the common integer case
            info, state, attr = self.item(), self.item(), self.item()
            cls = info.value[0] if isinstance(info, RObject) and info.value else None
            if cls == "compact_intseq":        # state = c(n, start, step) as doubles
                n, start, step = (int(x) for x in state.value)
                return RObject(INTSXP, [start + i * step for i in range(n)], self._attributes(attr))
            raise ExtractionError(f"ALTREP class {cls!r} is not supported")

        # the vector types: a length, the elements, then (if flagged) the attributes
        if rtype in (LGLSXP, INTSXP):
            n = self.length()
            value = [None if v == NA_INTEGER else v for v in struct.unpack(f">{n}i", self._take(4 * n))]
        elif rtype == REALSXP:
            n = self.length()
            value = list(struct.unpack(f">{n}d", self._take(8 * n)))
        elif rtype == CPLXSXP:
            n = self.length()
            pairs = struct.unpack(f">{2 * n}d", self._take(16 * n))
            value = [complex(pairs[2 * i], pairs[2 * i + 1]) for i in range(n)]
        elif rtype == RAWSXP:
            value = self._take(self.length())
        elif rtype in (STRSXP, VECSXP, EXPRSXP):   # STRSXP's elements are CHARSXP items
            value = [self.item() for _ in range(self.length())]
        else:
            raise ExtractionError(f"R SEXP type {rtype} is not supported by this reader")
        attributes = self._attributes(self.item()) if has_attr else {}
        return RObject(rtype, value, attributes)

    def _pairlist(self, rtype: int, has_attr: bool, has_tag: bool):
        """A pairlist (LISTSXP), read iteratively along its CDRs: ``{tag: CAR}`` in order.

        Each cell is [attributes] [tag] CAR, then CDR -- which is the next cell (a LISTSXP) or
        NILVALUE at the end. Untagged cells get keys 0, 1, ...; a call (LANGSXP: the function,
        then its arguments) is read the same way and not interpreted. Closures, promises and
        byte code, which also use cells, do not occur in data and are refused."""
        cells: dict = {}
        attributes: dict = {}
        while True:
            if has_attr:
                attributes.update(self._attributes(self.item()))
            tag = self.item() if has_tag else len(cells)
            cells[tag] = self.item()
            flags = self.int()                 # the CDR
            cdr_type = flags & 0xFF
            if cdr_type == NILVALUE_SXP:
                break
            if cdr_type != LISTSXP:            # an improper list's last CDR: not in these files
                raise ExtractionError(f"pairlist CDR of type {cdr_type} is not supported")
            has_attr, has_tag = bool(flags & (1 << 9)), bool(flags & (1 << 10))
        return RObject(rtype, cells, attributes)

    @staticmethod
    def _attributes(pairlist) -> dict:
        if pairlist is NULL:
            return {}
        if not (isinstance(pairlist, RObject) and pairlist.rtype == LISTSXP):
            raise ExtractionError("attributes that are not a pairlist")
        return {str(k): v for k, v in pairlist.value.items()}


def unserialize(data: bytes):
    return RReader(data).read()


def read_lazyload_db(rdx_path: pathlib.Path, rdb_path: pathlib.Path) -> dict:
    """All objects of an R lazy-load database: ``{name: RObject}``.

    The ``.rdx`` index is ``saveRDS`` output (gzip) of ``list(variables=, references=,
    compressed=)``; ``variables`` maps each name to ``c(offset, length)`` in the ``.rdb`` file."""
    index = unserialize(gzip.decompress(rdx_path.read_bytes()))
    names = index.attributes["names"].value
    fields = dict(zip(names, index.value))
    compressed = fields["compressed"].value[0]
    variables = fields["variables"]
    blob = rdb_path.read_bytes()
    out = {}
    for name, slot in zip(variables.attributes["names"].value, variables.value):
        offset, length = (int(x) for x in slot.value)
        chunk = blob[offset:offset + length]
        out[name] = unserialize(_inflate_chunk(chunk, compressed))
    return out


def _inflate_chunk(chunk: bytes, compressed) -> bytes:
    """One ``.rdb`` chunk: 4-byte big-endian uncompressed size, then the compressed stream.

    ``compressed`` TRUE (1) means zlib; 2 and 3 (bzip2, xz) put a type byte after the size. Only
    zlib occurs in janeaustenr; the others are refused rather than guessed at."""
    (size,) = struct.unpack(">I", chunk[:4])
    if compressed not in (True, 1):
        raise ExtractionError(f"rdb compression {compressed!r} (only zlib is supported)")
    data = zlib.decompress(chunk[4:])
    if len(data) != size:
        raise ExtractionError(f"rdb chunk inflated to {len(data)} bytes, header says {size}")
    return data


# --------------------------------------------------------------------------------------------
# Download and unpack
# --------------------------------------------------------------------------------------------

def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, **kw)
    if proc.returncode != 0:
        err = proc.stderr.decode("utf-8", "replace") if isinstance(proc.stderr, bytes) else proc.stderr
        raise ExtractionError(f"{' '.join(cmd)} exited {proc.returncode}:\n{err}")
    return proc


def fetch_debs(workdir: pathlib.Path, deb_dir: pathlib.Path | None) -> dict:
    """``{package: path to its .deb}``, downloaded into ``workdir`` unless ``deb_dir`` has them."""
    if deb_dir is None:
        run(["apt-get", "download", *PACKAGES], cwd=workdir)
        deb_dir = workdir
    debs = {}
    for pkg in PACKAGES:
        found = sorted(deb_dir.glob(f"{pkg}_*.deb"))
        if len(found) != 1:
            raise ExtractionError(f"expected one {pkg}_*.deb in {deb_dir}, found {found}")
        debs[pkg] = found[0]
    return debs


def deb_version(deb: pathlib.Path) -> str:
    return run(["dpkg-deb", "-f", str(deb), "Version"], text=True).stdout.strip()


def unpack(debs: dict, root: pathlib.Path) -> None:
    for deb in debs.values():
        run(["dpkg-deb", "-x", str(deb), str(root)])


# --------------------------------------------------------------------------------------------
# Normalisation
# --------------------------------------------------------------------------------------------

def normalise(text: str) -> str:
    """Unicode NFC and ``\\n`` line endings; trailing spaces removed from each line."""
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
    return "\n".join(line.rstrip() for line in text.split("\n"))


def collapse_spaces(text: str) -> str:
    """Runs of spaces become one space (the transcriptions put two after some sentences, one
    novel nearly always, another almost never; a character model should not learn which)."""
    return re.sub(r" {2,}", " ", text)


def lines_to_paragraphs(lines: list[str]) -> list[str]:
    """Join a novel's wrapped lines into paragraphs: the source separates paragraphs with empty
    lines, so each run of non-empty lines becomes one paragraph, its lines (stripped of their
    indentation) joined by one space. Several empty lines in a row count as one."""
    paragraphs, current = [], []
    for line in lines + [""]:
        line = line.strip()
        if line:
            current.append(line)
        elif current:
            paragraphs.append(collapse_spaces(" ".join(current)))
            current = []
    return paragraphs


#: Paragraphs that are an edition's notes, not Austen's text: (novel, how the paragraph starts,
#: whether everything after it goes too). Each must be found exactly once.
AUSTEN_EDITORIAL = (
    ("sensesensibility", "[At this point in the first and second editions, Volume 1 ends.]", False),
    ("sensesensibility", "[At this point in the first and second editions, Volume II ended.]", False),
    ("mansfieldpark", "[End volume one of this edition. Printed by T. and A. Constable,", False),
    ("northangerabbey", "A NOTE ON THE TEXT", True),      # a note on the Signet Classic text, at the end
)


def austen_text(root: pathlib.Path) -> str:
    """The six novels, each starting with its own title line (the source's first line, e.g.
    ``SENSE AND SENSIBILITY``, ``Persuasion``) and front matter (``by Jane Austen``, the year):
    paragraphs one per line with a blank line between them, novels separated by two blank lines
    (three newlines in a row occur only there)."""
    data_dir = root / "usr/lib/R/site-library/janeaustenr/data"
    objects = read_lazyload_db(data_dir / "Rdata.rdx", data_dir / "Rdata.rdb")
    novels = []
    for name, title in AUSTEN_NOVELS:
        obj = objects.get(name)
        if obj is None or obj.rtype != STRSXP:
            raise ExtractionError(f"janeaustenr has no character vector {name!r} (has {sorted(objects)})")
        if any(line is None for line in obj.value):
            raise ExtractionError(f"{name} has NA lines")
        lines = normalise("\n".join(obj.value)).split("\n")
        paragraphs = lines_to_paragraphs(lines)
        if paragraphs[0].upper() != title.upper():
            raise ExtractionError(f"{name} starts with {paragraphs[0]!r}, not its title {title!r}")
        for novel, start, rest_too in AUSTEN_EDITORIAL:
            if novel != name:
                continue
            hits = [i for i, p in enumerate(paragraphs) if p.startswith(start)]
            if len(hits) != 1:
                raise ExtractionError(f"{name}: editorial note {start!r} found {len(hits)} times")
            del paragraphs[hits[0]:None if rest_too else hits[0] + 1]
        if len(paragraphs) < 1000:
            raise ExtractionError(f"{name}: only {len(paragraphs)} paragraphs")
        novels.append("\n\n".join(paragraphs) + "\n")
    return "\n\n".join(novels)


#: a chapter heading of ``bible``'s unformatted listing (``Genesis 1``, ``1 Samuel 3``, ``Song of
#: Solomon 2``) and one verse of it (two spaces, the verse number, a space, the verse)
CHAPTER_RE = re.compile(r"^(?P<book>\S.*?) (?P<chapter>\d+)$")
VERSE_RE = re.compile(r"^ +(?P<verse>\d+) (?P<text>\S.*)$")


def kjv_text(root: pathlib.Path) -> str:
    """The whole KJV printed by the package's own ``bible`` program, as prose.

    ``bible -p DATADIR -l100000 Gen1:1-Rev22:21`` (the unformatted listing, lines too wide to
    wrap) prints, for each chapter, a blank line, a heading ``Book N``, a blank line, then one
    line per verse, ``  V text``. The output keeps the verse text and the books' names: each
    book is a title line and a blank line, then its chapters, each chapter its verses one per
    line, a blank line between chapters; books separated by two blank lines."""
    program, data_dir = root / "usr/bin/bible", root / "usr/lib"
    if not (data_dir / "bible.data").is_file():
        raise ExtractionError(f"no bible.data in {data_dir}")
    out = run([str(program), "-p", str(data_dir), "-l100000", KJV_RANGE],
              stdin=subprocess.DEVNULL).stdout
    listing = normalise(out.decode("ascii"))   # the KJV data is plain ASCII; anything else is an error

    books: list[tuple[str, list[list[str]]]] = []
    n_verses = 0
    expected_verse = None
    for lineno, line in enumerate(listing.split("\n"), 1):
        if not line:
            continue
        if m := VERSE_RE.match(line):
            verse = int(m["verse"])
            if expected_verse is None or verse != expected_verse:
                raise ExtractionError(f"bible output line {lineno}: verse {verse}, expected {expected_verse}")
            expected_verse += 1
            books[-1][1][-1].append(collapse_spaces(m["text"]))
            n_verses += 1
        elif m := CHAPTER_RE.match(line):
            book, chapter = m["book"], int(m["chapter"])
            if not books or books[-1][0] != book:
                books.append((book, []))
            if chapter != len(books[-1][1]) + 1:
                raise ExtractionError(f"bible output line {lineno}: {book} {chapter} out of order")
            books[-1][1].append([])
            expected_verse = 1
        else:
            raise ExtractionError(f"bible output line {lineno} is neither a heading nor a verse: {line!r}")
    n_chapters = sum(len(ch) for _, ch in books)
    if (len(books), n_chapters, n_verses) != (KJV_BOOKS, KJV_CHAPTERS, KJV_VERSES):
        raise ExtractionError(f"bible printed {len(books)} books, {n_chapters} chapters, {n_verses} verses; "
                              f"the KJV has {KJV_BOOKS}, {KJV_CHAPTERS}, {KJV_VERSES}")
    parts = []
    for book, chapters in books:
        body = "\n\n".join("\n".join(verses) for verses in chapters)
        parts.append(book + "\n\n" + body + "\n")
    return "\n\n".join(parts)


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------

def gzip_bytes(text: str) -> bytes:
    """Deterministic gzip: no file name and mtime 0 in the header, maximal compression."""
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as f:
        f.write(text.encode("utf-8"))
    return buf.getvalue()


def write(name: str, text: str, out_dir: pathlib.Path) -> tuple[int, int]:
    if "\r" in text or "\ufeff" in text:
        raise ExtractionError(f"{name}: stray carriage return or byte-order mark")
    blob = gzip_bytes(text)
    if len(blob) >= MAX_COMPRESSED_BYTES:
        raise ExtractionError(f"{name}: {len(blob)} bytes compressed, over {MAX_COMPRESSED_BYTES}")
    if gzip.decompress(blob).decode("utf-8") != text:
        raise ExtractionError(f"{name}: gzip round trip failed")
    path = out_dir / name
    path.write_bytes(blob)
    return len(text), len(blob)


def describe(label: str, text: str) -> str:
    counts = collections.Counter(text)
    non_ascii = "".join(sorted(c for c in counts if ord(c) > 127))
    return (f"{label}: {len(text):,} characters, {len(counts)} distinct"
            + (f" (non-ASCII: {non_ascii!r})" if non_ascii else " (all ASCII)"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--deb-dir", type=pathlib.Path, help="use the .deb files in this folder "
                        "instead of downloading them")
    parser.add_argument("--out-dir", type=pathlib.Path, default=HERE,
                        help="where to write (default: %(default)s)")
    parser.add_argument("--rarest", type=int, default=20, help="list this many rarest characters")
    args = parser.parse_args(argv)

    for tool in ("dpkg-deb",) + (() if args.deb_dir else ("apt-get",)):
        if shutil.which(tool) is None:
            raise ExtractionError(f"{tool} not found: this script needs a Debian system")
    workdir = pathlib.Path(tempfile.mkdtemp(prefix="lora_np_texts_"))
    try:
        debs = fetch_debs(workdir, args.deb_dir)
        for pkg, deb in debs.items():
            print(f"{pkg} {deb_version(deb)}  ({deb.name}, {deb.stat().st_size:,} bytes)")
        root = workdir / "root"
        unpack(debs, root)
        texts = {"austen.txt.gz": austen_text(root), "kjv.txt.gz": kjv_text(root)}
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name, text in texts.items():
        n_chars, n_bytes = write(name, text, args.out_dir)
        print(f"wrote {args.out_dir / name}: {n_bytes:,} bytes gzip")
        print("  " + describe(name.split(".")[0], text))
    union = collections.Counter()
    for text in texts.values():
        union.update(text)
    print(f"union: {len(union)} distinct characters")
    rare = sorted(union.items(), key=lambda kv: (kv[1], kv[0]))[:args.rarest]
    print(f"the {len(rare)} rarest characters (both texts): "
          + ", ".join(f"{c!r} {n}" for c, n in rare))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ExtractionError, OSError, UnicodeDecodeError, zlib.error) as exc:
        print(f"extract_texts: {exc}", file=sys.stderr)
        sys.exit(1)
