"""The real Phi-3 tokenizer, offline: llama.cpp's Phi-3 vocabulary, checked against its vectors.

    make phi3-tokenizer          # or: python -m phi3ops.model.phi3_tokenizer [CACHE_DIR]

Phi-3-mini's 32,064-token SentencePiece tokenizer cannot come from the hub here, but the source
distribution of llama-cpp-python on PyPI carries llama.cpp's `ggml-vocab-phi-3.gguf` (the
vocabulary alone, no weights) and reference vectors: texts and the ids the original tokenizer
gives them. The archive is fetched once (by `pip download`, or a file named by
PHI3OPS_LLAMA_CPP_SDIST), checked against a pinned sha256 before it is opened, and only those
three files are read from it. transformers turns the GGUF vocabulary into a fast tokenizer, which
is saved as an ordinary tokenizer directory with the hub's current Phi-3 chat template, loaded
back, and must reproduce every reference vector or the build stops.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from phi3ops.config import PHI3_VOCAB_SIZE, file_sha256, sha256_json
from phi3ops.errors import ModelNotAvailableError
from phi3ops.model.templates import PHI3_TEMPLATE

log = logging.getLogger(__name__)
REQUIREMENT = "llama-cpp-python==0.3.36"
SDIST = "llama_cpp_python-0.3.36.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
MEMBERS = "llama_cpp_python-0.3.36/vendor/llama.cpp/models/"
GGUF = "ggml-vocab-phi-3.gguf"
VECTOR_SEPARATOR = "\n__ggml_vocab_test__\n"
# Ids of Phi-3-mini's special tokens: the built tokenizer must have exactly these.
SPECIAL_IDS = {"<unk>": 0, "<s>": 1, "</s>": 2, "<|endoftext|>": 32000, "<|assistant|>": 32001,
               "<|system|>": 32006, "<|end|>": 32007, "<|user|>": 32010}
BUILDER_VERSION = 2  # 2: the saved config no longer records HF_HUB_OFFLINE
DOWNLOADS = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "phi3ops"


def tokenizer_dir(cache_dir: Path) -> Path:
    key = sha256_json({"sdist": SDIST_SHA256, "template": PHI3_TEMPLATE,
                       "builder": BUILDER_VERSION})[:12]
    return Path(cache_dir) / f"phi3-tokenizer-{key}"


def ensure_phi3_tokenizer(cache_dir: Path) -> Path:
    """The verified tokenizer directory, built on first use (about 15 s and one download)."""
    target = tokenizer_dir(cache_dir)
    if (target / "tokenizer.json").is_file():
        return target
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".building-", dir=cache_dir))
    try:
        build(fetch_sdist(), staging)
        try:
            staging.rename(target)  # atomic: a half-built tokenizer is never visible
        except OSError:  # another process finished first
            pass
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def fetch_sdist() -> Path:
    """The pinned archive: a given file, the download cache, or pip."""
    given = os.environ.get("PHI3OPS_LLAMA_CPP_SDIST")
    path = Path(given) if given else DOWNLOADS / SDIST
    if not path.is_file():
        if given:
            raise ModelNotAvailableError(f"PHI3OPS_LLAMA_CPP_SDIST={given}: no such file")
        pip_download(path)
    digest = file_sha256(path)
    if digest != SDIST_SHA256:
        raise ModelNotAvailableError(
            f"{path}: sha256 {digest} is not the pinned {SDIST}'s {SDIST_SHA256}; the file is "
            "corrupt or another one. Delete it and build again (make phi3-tokenizer).")
    return path


def pip_download(path: Path) -> None:
    """The archive through pip, so the user's pip configuration applies: index, mirror, proxy,
    certificates. pip also prepares the package's metadata, so this takes about half a minute,
    once per machine."""
    log.info("fetching %s with pip download (once; kept in %s)", SDIST, path.parent)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        done = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary",
             ":all:", "--dest", tmp, REQUIREMENT], capture_output=True, text=True)
        fetched = Path(tmp) / SDIST
        if done.returncode != 0 or not fetched.is_file():
            raise ModelNotAvailableError(
                f"pip could not download {REQUIREMENT} ({SDIST}), which carries Phi-3's "
                f"vocabulary: {(done.stderr or done.stdout).strip()[-600:]}. Fix: check pip's "
                "index and proxy settings (pip config list), or download that file where you "
                "can (pip download --no-deps --no-binary :all: "
                f"{REQUIREMENT}) and set PHI3OPS_LLAMA_CPP_SDIST to its path.")
        os.replace(fetched, path)


def extract_vocab(sdist: Path, out_dir: Path) -> Path:
    """Read the GGUF and its two vector files out of the archive, nothing else."""
    with tarfile.open(sdist, "r:gz") as archive:
        for name in (GGUF, GGUF + ".inp", GGUF + ".out"):
            member = archive.getmember(MEMBERS + name)
            if not member.isfile():
                raise ModelNotAvailableError(f"{sdist}: {name} is not a regular file")
            with archive.extractfile(member) as src, (out_dir / name).open("wb") as dst:
                shutil.copyfileobj(src, dst)
    return out_dir / GGUF


def reference_vectors(gguf: Path) -> list[tuple[str, list[int]]]:
    """llama.cpp's test pairs: texts split on a marker line, one line of ids per text."""
    texts = gguf.with_name(gguf.name + ".inp").read_text(encoding="utf-8").split(VECTOR_SEPARATOR)
    ids = gguf.with_name(gguf.name + ".out").read_text(encoding="utf-8").split("\n")
    if len(texts) != len(ids):
        raise ModelNotAvailableError(f"{gguf}: {len(texts)} reference texts but {len(ids)} "
                                     "lines of ids")
    return [(text, [int(i) for i in line.split()]) for text, line in zip(texts, ids, strict=True)]


def check_tokenizer(tokenizer, vectors: list[tuple[str, list[int]]]) -> None:
    """Stop at the first difference from Phi-3's tokenizer: vocabulary, special ids, vectors."""
    problems = []
    if len(tokenizer) != PHI3_VOCAB_SIZE:
        problems.append(f"{len(tokenizer)} tokens, not {PHI3_VOCAB_SIZE}")
    for token, want in SPECIAL_IDS.items():
        if tokenizer.convert_tokens_to_ids(token) != want:
            problems.append(f"{token} has id {tokenizer.convert_tokens_to_ids(token)}, not {want}")
    for n, (text, want) in enumerate(vectors):
        got = tokenizer.encode(text, add_special_tokens=False)
        if got != want:
            problems.append(f"reference vector {n} ({text[:40]!r}): ids {got[:12]} differ from "
                            f"{want[:12]}")
    if problems:
        raise ModelNotAvailableError(
            "the Phi-3 tokenizer built from llama.cpp's vocabulary does not match the original: "
            + "; ".join(problems[:5]) + ". The installed transformers/gguf versions read the GGUF "
            "differently; pin the versions in pyproject.toml and build again.")


def build(sdist: Path, out_dir: Path) -> None:
    """GGUF vocabulary -> tokenizer directory with Phi-3's template, verified after reloading."""
    from transformers import AutoTokenizer

    from phi3ops.model.base_model import (
        forget_how_loaded,  # not at the top: modeling imports this module
    )

    with tempfile.TemporaryDirectory() as tmp:
        gguf = extract_vocab(sdist, Path(tmp))
        vectors = reference_vectors(gguf)
        tokenizer = AutoTokenizer.from_pretrained(tmp, gguf_file=GGUF)
    forget_how_loaded(tokenizer)
    tokenizer.chat_template = PHI3_TEMPLATE
    tokenizer.model_max_length = 4096
    tokenizer.pad_token = "<|endoftext|>"  # as on the hub: pad is eos, never a turn's end
    tokenizer.save_pretrained(str(out_dir))
    reloaded = AutoTokenizer.from_pretrained(str(out_dir))
    check_tokenizer(reloaded, vectors)
    log.info("Phi-3 tokenizer: %d tokens, %d reference vectors match", len(reloaded),
             len(vectors))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(ensure_phi3_tokenizer(Path(sys.argv[1] if len(sys.argv) > 1 else ".cache/models")))
