"""The `store` fixture: every contract test runs once per backend.

SQLite in the test's tmp_path, and PostgreSQL on the session cluster from
tests/conftest.py (a fresh database per test). Both go through `open_store`,
so migrations run for every test.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from siterecovery.controller.store import Store, open_store


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_url(request: pytest.FixtureRequest, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/store.db"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    opened = open_store(store_url)
    yield opened
    opened.close()
