"""Shared fixtures: every test gets its own cache folder, nothing touches ~/.cache."""

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
WIKITEXT2 = REPO.parent / "shared" / "data" / "wikitext-2"


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    cache = tmp_path / "moe-data-cache"
    monkeypatch.setenv("MOE_DATA_CACHE", str(cache))
    return cache


@pytest.fixture
def write(tmp_path):
    """write(name, content) -> path; str content is written as UTF-8."""

    def _write(name: str, content) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str):
            path.write_text(content, encoding="utf-8")
        else:
            path.write_bytes(content)
        return path

    return _write


@pytest.fixture(scope="session")
def wikitext2_dir() -> Path:
    """The real WikiText-2 valid and test files, kept beside the repo in shared/ (never copied in)."""
    if not WIKITEXT2.is_dir():
        pytest.skip(
            f"WikiText-2 files not found at {WIKITEXT2} (shared/ is not beside this checkout)"
        )
    return WIKITEXT2
