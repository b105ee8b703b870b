"""Fixtures the service's tests share."""

import pytest

import pidec

from ..shared_data import tiny_checkpoint


@pytest.fixture(scope="module")
def steady(tmp_path_factory):
    """A model that never writes EOS: every row runs to its budget, so a request stays in flight
    for as long as the test needs."""
    return pidec.load(tiny_checkpoint(tmp_path_factory.mktemp("steady"), seed=1, max_input_length=600, eos_boost=0.0))
