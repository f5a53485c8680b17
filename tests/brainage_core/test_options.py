import pytest

from brainage_core.options import as_bool, as_non_negative


@pytest.mark.parametrize("value", [True, 1, "true", "True", "TRUE", "yes", "on", "1", " true "])
def test_true_spellings(value):
    assert as_bool(value) is True


@pytest.mark.parametrize("value", [False, 0, None, "false", "False", "no", "off", "0", "none", ""])
def test_false_spellings(value):
    assert as_bool(value) is False


@pytest.mark.parametrize("value", ["maybe", 2, 0.5, [True]])
def test_anything_else_is_an_error_naming_the_option(value):
    with pytest.raises(ValueError, match="position_embedding must be true or false"):
        as_bool(value, "position_embedding")


@pytest.mark.parametrize("value, number", [(0, 0.0), (0.75, 0.75), ("1.5", 1.5)])
def test_non_negative_numbers_and_their_text(value, number):
    assert as_non_negative(value) == number


@pytest.mark.parametrize("value", [-0.5, "-1", "wide", None, float("nan")])
def test_negative_or_non_numbers_are_an_error_naming_the_option(value):
    with pytest.raises(ValueError, match="input_smoothing_sigma must be a number >= 0"):
        as_non_negative(value, "input_smoothing_sigma")
