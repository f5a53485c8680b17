import pytest

from brainage_core.options import as_bool


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
