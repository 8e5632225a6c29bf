"""deepnet.flags: the one check of integer flags that every command uses."""

import numpy as np
import pytest

from deepnet.errors import ConfigError
from deepnet.flags import int_at_least


@pytest.mark.parametrize("value", [True, np.bool_(True), 1.5, "3", None, -1, 0])
def test_int_at_least_refuses_with_the_flag_named(value):
    with pytest.raises(ConfigError, match=r"^--eval-every must be an integer >= 1 \(0: never\), got "):
        int_at_least("eval-every", value, 1, " (0: never)")


@pytest.mark.parametrize("value", [0, 7, np.int64(7), np.int32(0)])
def test_int_at_least_returns_a_plain_int(value):
    result = int_at_least("holdout", value, 0)
    assert result == value and type(result) is int
