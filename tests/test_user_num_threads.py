"""`fastbn.get_user_num_threads`: the count set with `set_num_threads`, or
None (and never a count an integration such as fastbn.torch picked)."""
import pytest

import fastbn
from fastbn import _config


@pytest.fixture(autouse=True)
def restore_threads():
    yield
    fastbn.set_num_threads(None)


def test_user_num_threads_is_none_until_set_and_after_reset():
    fastbn.set_num_threads(None)
    assert fastbn.get_user_num_threads() is None
    fastbn.set_num_threads(3)
    assert fastbn.get_user_num_threads() == 3
    fastbn.set_num_threads(1)
    assert fastbn.get_user_num_threads() == 1
    fastbn.set_num_threads(None)
    assert fastbn.get_user_num_threads() is None


@pytest.mark.parametrize("bad, error", [(0, ValueError), (-2, ValueError), (1.5, TypeError),
                                        ("2", TypeError)])
def test_rejected_counts_leave_the_user_count_unchanged(bad, error):
    fastbn.set_num_threads(2)
    with pytest.raises(error, match="n"):
        fastbn.set_num_threads(bad)
    assert fastbn.get_user_num_threads() == 2


def test_a_followed_count_limits_kernels_but_is_not_reported_as_the_users():
    fastbn.set_num_threads(None)
    _config._follow_num_threads(1)
    assert fastbn.get_num_threads() == 1
    assert fastbn.get_user_num_threads() is None


def test_following_does_nothing_once_the_user_chose_a_count():
    fastbn.set_num_threads(2)
    _config._follow_num_threads(1)
    assert fastbn.get_user_num_threads() == 2
    assert fastbn._core.get_user_threads() == 2
