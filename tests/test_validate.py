"""sdediff._validate: the helpers is_int and check_ints (what each accepts, what each message says)."""

import pytest

from sdediff._validate import check_ints, is_int


def test_is_int_refuses_bools_and_floats():
    assert is_int(3) and is_int(0) and is_int(-2)
    assert not is_int(True) and not is_int(3.0) and not is_int("3") and not is_int(None)


def test_check_ints_returns_a_tuple_of_the_values():
    assert check_ints("shape", [4, 2]) == (4, 2)
    assert check_ints("shape", (x for x in (1, 2, 3))) == (1, 2, 3)
    assert check_ints("pads", (0, 5), minimum=0) == (0, 5)


@pytest.mark.parametrize("values, error", [((), ValueError), ((2, 0), ValueError), ((2, True), TypeError),
                                           ((2, 1.0), TypeError), (3, TypeError), ("ab", TypeError), (None, TypeError)])
def test_check_ints_names_the_argument(values, error):
    with pytest.raises(error, match=r"channel_mults must be a non-empty sequence of positive integers, got"):
        check_ints("channel_mults", values)


def test_check_ints_states_the_minimum():
    with pytest.raises(ValueError, match="sequence of integers >= 2"):
        check_ints("sizes", (2, 1), minimum=2)
