"""Planning the read of raw logs (driver side): which input files, which chunks (byte ranges of text
files, row groups of parquet files), and the reader options; every check that refuses an input that is not
data at all (a missing column, a compressed, archived, UTF-16 or binary file) happens here, naming the file.
The chunks are parsed by seater_dist.data.readers (worker side); the formats are described there.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import PurePosixPath

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from seater_dist import artifacts
from seater_dist.data.errors import DataError
from seater_dist.files import UTF8_BOM, identify
from seater_dist.formats import FORMATS

ROW_BITS = 40  # ord = file_index << ROW_BITS | row
TEXT_CHUNK_BYTES = 32 << 20
# What to do with a file that is not text we read, by its kind (seater_dist.files.identify).
_NOT_TEXT_ADVICE = {"gzip": "decompress it first (gunzip)", "bzip2": "decompress it first (bunzip2)",
                    "xz": "decompress it first (unxz)", "zstd": "decompress it first (unzstd)",
                    "zip": "extract it first (unzip)", "parquet": "name it .parquet and use --format interactions",
                    "utf16": "convert it to UTF-8, e.g. iconv -f utf-16 -t utf-8 IN > OUT"}
_COMPRESSED = (".gz", ".bz2", ".xz", ".zst", ".zip", ".7z")
@dataclass(frozen=True)
class Chunk:
    """One unit of reading work: a byte range of a text file or one row group of a parquet file."""

    file: str
    file_index: int
    kind: str  # "text" | "parquet"
    start: int = 0  # text: byte offsets [start, end); parquet: row group index in `start`
    end: int = 0
    first_row: int = 1  # 1-based row number of the chunk's first line / row
    columns: tuple[str, ...] = ()  # text tables: the header's column names (chunk excludes the header)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ReaderOptions:
    """What a reader needs besides the chunk: the format and the column names to use."""

    format: str
    user_column: str
    item_column: str
    time_column: str
    string_ids: bool = True  # False only when every input file stores both ids as integers (parquet)


def reader_options(fmt: str, user_column: str | None, item_column: str | None,
                   time_column: str | None) -> ReaderOptions:
    u, i, t = FORMATS[fmt].columns
    return ReaderOptions(fmt, user_column or u, item_column or i, time_column or t)


def list_input_files(path: str, fmt: str) -> tuple[pafs.FileSystem, list[str]]:
    """The data files of ``path`` (a file, or a directory whose data files are read in name order).

    Files whose names start with ``_`` or ``.`` are skipped (Hadoop/Spark convention for metadata).
    Raises DataError if the path does not exist or holds no data file.
    """
    fs, root = artifacts.resolve(path)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise DataError(f"{path}: input not found")
    if info.type == pafs.FileType.File:
        return fs, [root]
    entries = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    exts = FORMATS[fmt].extensions
    files = sorted(e.path for e in entries if e.type == pafs.FileType.File
                   and not any(p.startswith(("_", ".")) for p in PurePosixPath(e.path).relative_to(root).parts)
                   and PurePosixPath(e.path).suffix.lower() in exts)
    if not files:
        packed = sorted(PurePosixPath(e.path).name for e in entries if e.type == pafs.FileType.File
                        and PurePosixPath(e.path).suffix.lower() in _COMPRESSED)
        hint = f"; it holds compressed files ({', '.join(packed[:3])}): decompress them first" if packed else ""
        raise DataError(f"{path}: directory holds no {fmt} data files (looked for {', '.join(e for e in exts if e)})"
                        + hint)
    return fs, files


def integer_ids(fs: pafs.FileSystem, files: list[str], opts: ReaderOptions) -> ReaderOptions:
    """``opts`` with ``string_ids=False`` if every file is parquet with integer user and item columns.

    One id type for the whole input: a Ray block of int ids and one of string ids cannot be shuffled
    together, and the dense order (numeric or by text) must not depend on which file a row came from.
    """
    for file in files:
        if not _is_parquet(file):
            return replace(opts, string_ids=True)
        with fs.open_input_file(file) as f:
            try:
                schema = pq.ParquetFile(f).schema_arrow
            except (pa.ArrowInvalid, OSError) as err:
                raise DataError(f"{file}: not a readable parquet file ({err})") from None
        for col in (opts.user_column, opts.item_column):
            if col in schema.names and not pa.types.is_integer(schema.field(col).type):
                return replace(opts, string_ids=True)
    return replace(opts, string_ids=False)


def plan_chunks(fs: pafs.FileSystem, files: list[str], opts: ReaderOptions,
                chunk_bytes: int = TEXT_CHUNK_BYTES) -> list[Chunk]:
    """Split every file into chunks; checks each file is non-empty and (tables) has the needed columns."""
    chunks: list[Chunk] = []
    for index, file in enumerate(files):
        if _is_parquet(file):
            chunks += _plan_parquet(fs, file, index, opts)
        else:
            chunks += _plan_text(fs, file, index, opts, chunk_bytes)
    # each chunk names its file as a URI, so that a read task on any node opens it from there
    return [replace(c, file=artifacts.uri(fs, c.file)) for c in chunks]


def _is_parquet(file: str) -> bool:
    return PurePosixPath(file).suffix.lower() in (".parquet", ".pq")


def _plan_parquet(fs: pafs.FileSystem, file: str, index: int, opts: ReaderOptions) -> list[Chunk]:
    if opts.format != "interactions":
        raise DataError(f"{file}: parquet input is read by --format interactions, not {opts.format}")
    with fs.open_input_file(file) as f:
        try:
            meta = pq.ParquetFile(f).metadata
        except (pa.ArrowInvalid, OSError) as err:
            raise DataError(f"{file}: not a readable parquet file ({err})") from None
        names = meta.schema.to_arrow_schema().names
    _check_columns(file, names, opts)
    if meta.num_rows == 0:
        raise DataError(f"{file}: empty file (no rows)")
    chunks, first = [], 1
    for g in range(meta.num_row_groups):
        n = meta.row_group(g).num_rows
        if n:
            chunks.append(Chunk(file, index, "parquet", g, g + 1, first))
        first += n
    return chunks


def _check_columns(file: str, names: list[str], opts: ReaderOptions) -> None:
    wanted = {"user column": opts.user_column, "item column": opts.item_column, "time column": opts.time_column}
    for role, col in wanted.items():
        if col not in names:
            raise DataError(f"{file}: no column '{col}' ({role}); columns are: {', '.join(names)}")


def _plan_text(fs: pafs.FileSystem, file: str, index: int, opts: ReaderOptions, chunk_bytes: int) -> list[Chunk]:
    """Cut a text file at line boundaries near every ``chunk_bytes``, counting lines to number rows."""
    size = fs.get_file_info(file).size
    if size == 0:
        raise DataError(f"{file}: empty file (no rows)")
    columns: tuple[str, ...] = ()
    first_row = 1
    with fs.open_input_file(file) as f:
        head = f.read(min(size, 1 << 16))
        _check_is_text(file, head)
        start = len(UTF8_BOM) if head.startswith(UTF8_BOM) else 0  # Excel's "CSV UTF-8" begins with a BOM
        if start >= size:
            raise DataError(f"{file}: empty file (no rows)")
        f.seek(start)
        if _has_header(file, opts):
            header = f.read(min(size - start, 1 << 20)).split(b"\n", 1)[0]
            columns = _header_columns(file, header, opts)
            start, first_row = start + len(header) + 1, 2
            if start >= size:
                raise DataError(f"{file}: empty file (a header and no rows)")
        chunks, pos, row = [], start, first_row
        while pos < size:
            end = min(size, pos + chunk_bytes)
            f.seek(pos)
            block = f.read(end - pos)
            if end < size:  # extend to the end of the line
                tail = b""
                while end < size and not tail.endswith(b"\n"):
                    piece = f.read(min(1 << 16, size - end))
                    cut = piece.find(b"\n")
                    piece = piece if cut < 0 else piece[: cut + 1]
                    tail += piece
                    end += len(piece)
                block += tail
            chunks.append(Chunk(file, index, "text", pos, end, row, columns))
            row += block.count(b"\n") + (0 if block.endswith(b"\n") else 1)
            pos = end
    return chunks


def _check_is_text(file: str, head: bytes) -> None:
    """DataError naming what ``file`` is (:func:`seater_dist.files.identify`) unless its first bytes are text."""
    kind = identify(head)
    if kind.name in _NOT_TEXT_ADVICE:
        raise DataError(f"{file}: {kind.description}; {_NOT_TEXT_ADVICE[kind.name]}")
    if kind.name != "text":
        raise DataError(f"{file}: {kind.description}, not text in the {'/'.join(FORMATS)} formats")


def not_utf8_error(data: bytes, chunk: Chunk) -> DataError:
    """The error for a chunk whose text is not UTF-8, naming the first such row and byte."""
    for i, line in enumerate(data.split(b"\n")):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as err:
            return DataError(f"{chunk.file}: row {chunk.first_row + i}: not UTF-8 text (byte 0x{line[err.start]:02x} "
                             f"at column {err.start + 1}); convert the file to UTF-8, e.g. "
                             "iconv -f latin1 -t utf-8 IN > OUT")
    return DataError(f"{chunk.file}: not UTF-8 text; convert the file to UTF-8")


def decode_utf8(line: bytes, chunk: Chunk, row: int) -> str:
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError:
        raise not_utf8_error(line, replace(chunk, first_row=row)) from None


def _has_header(file: str, opts: ReaderOptions) -> bool:
    if opts.format == "interactions":
        return True
    if opts.format == "movielens":
        return not file.endswith(".dat")
    return False


def delimiter_of(file: str, opts: ReaderOptions) -> str:
    if opts.format == "movielens":
        return "\t"  # .inter is TSV; ratings.dat's '::' is rewritten to a tab before parsing
    return "\t" if file.lower().endswith((".tsv", ".inter", ".txt")) else ","


def _header_columns(file: str, header: bytes, opts: ReaderOptions) -> tuple[str, ...]:
    text = header.decode("utf-8", errors="replace").rstrip("\r")
    delim = delimiter_of(file, opts)
    names = [c.strip().strip('"') for c in text.split(delim)]
    if opts.format == "movielens":  # RecBole: `user_id:token` -> `user_id`
        names = [n.split(":", 1)[0] for n in names]
    others = [d for d in ("\t", ",", ";", "|") if d != delim and d in text]
    if len(names) == 1 and others:
        shown = {"\t": "tab", ",": "comma", ";": "semicolon", "|": "pipe"}
        fix = ("rename it to .csv" if others[0] == "," else "rename it to .tsv" if others[0] == chr(9)
               else "convert it to comma- or tab-separated")
        raise DataError(f"{file}: the header is one column {text[:80]!r}: this file is read as "
                        f"{shown[delim]}-separated (by its name) but its header is {shown[others[0]]}-separated; "
                        f"{fix}")
    _check_columns(file, names, opts)
    return tuple(names)
