from __future__ import annotations

import pytest

from tests.export.study_fixture import make_tiny_study


@pytest.fixture(scope="session")
def tiny_study(tmp_path_factory):
    return make_tiny_study(tmp_path_factory.mktemp("studies", numbered=True))
