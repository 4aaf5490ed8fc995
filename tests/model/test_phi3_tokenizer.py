"""Fetching the archive that carries Phi-3's vocabulary: through pip, checked before use."""

import pytest

from phi3ops.errors import ModelNotAvailableError
from phi3ops.model import phi3_tokenizer


@pytest.fixture
def own_pip_config(tmp_path, monkeypatch):
    """pip with only this test's settings: no config files, no find-links of the machine's."""
    for name in ("PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL", "PIP_CONSTRAINT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    monkeypatch.setattr(phi3_tokenizer, "DOWNLOADS", tmp_path / "downloads")
    return tmp_path


def test_the_archive_comes_from_the_index_pip_is_configured_with(own_pip_config, monkeypatch):
    # A team's mirror, here an empty one on disk: pip asks it, and its answer reaches the user.
    mirror = own_pip_config / "mirror"
    mirror.mkdir()
    monkeypatch.setenv("PIP_INDEX_URL", mirror.as_uri())
    with pytest.raises(ModelNotAvailableError) as failed:
        phi3_tokenizer.fetch_sdist()
    message = str(failed.value)
    assert "pip could not download llama-cpp-python==0.3.36" in message
    assert "No matching distribution found" in message  # pip's own words, from the mirror
    assert "PHI3OPS_LLAMA_CPP_SDIST" in message and "pip config list" in message
    assert not list((own_pip_config / "downloads").iterdir()), "nothing half-fetched is kept"


def test_a_given_archive_is_checked_against_the_pinned_sha256(own_pip_config, monkeypatch):
    impostor = own_pip_config / phi3_tokenizer.SDIST
    impostor.write_bytes(b"not the archive")
    monkeypatch.setenv("PHI3OPS_LLAMA_CPP_SDIST", str(impostor))
    with pytest.raises(ModelNotAvailableError, match="is not the pinned"):
        phi3_tokenizer.fetch_sdist()
    monkeypatch.setenv("PHI3OPS_LLAMA_CPP_SDIST", str(own_pip_config / "missing.tar.gz"))
    with pytest.raises(ModelNotAvailableError, match="no such file"):
        phi3_tokenizer.fetch_sdist()
