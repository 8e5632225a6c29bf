"""deepnet.flags: the checks of flag values that every command uses."""

import numpy as np
import pytest

from deepnet.errors import ConfigError
from deepnet.flags import int_at_least, non_negative_number, positive


@pytest.mark.parametrize("value", [True, np.bool_(True), 1.5, "3", None, -1, 0])
def test_int_at_least_refuses_with_the_flag_named(value):
    with pytest.raises(ConfigError, match=r"^--eval-every must be an integer >= 1 \(0: never\), got "):
        int_at_least("eval-every", value, 1, " (0: never)")


@pytest.mark.parametrize("value", [0, 7, np.int64(7), np.int32(0)])
def test_int_at_least_returns_a_plain_int(value):
    result = int_at_least("holdout", value, 0)
    assert result == value and type(result) is int


@pytest.mark.parametrize("value,message", [(0, "must be > 0"), (-2.5, "must be > 0"), (float("inf"), "must be finite"),
                                           (True, "must be a finite number"), ("1", "must be a finite number")])
def test_positive_number_refuses_with_the_flag_named(value, message):
    with pytest.raises(ConfigError, match=rf"^--lr {message}, got "):
        positive("lr", value, float)


@pytest.mark.parametrize("value", [-0.1, float("nan"), float("inf"), True, "0"])
def test_non_negative_number_refuses_with_the_flag_named(value):
    with pytest.raises(ConfigError, match=r"^--eval-gate must be a finite number >= 0, got "):
        non_negative_number("eval-gate", value)
    non_negative_number("eval-gate", 0)   # 0 and positive numbers pass
    positive("steps", 3)
