"""brainage_core.checks: an error lists one problem per line, whatever characters the values it names hold."""
import pytest

from brainage_core.checks import validate_records
from brainage_core.volumes import InputError


@pytest.mark.parametrize("subject", ["a\nb", "\x1e\x1e", "x\u2028y", "r\rs", "tab\tand é"])
def test_each_problem_stays_on_its_line(subject):
    with pytest.raises(InputError) as err:
        validate_records([{"image": "missing.nii.gz", "age": None, "subject": subject}], target_key="age")
    lines = str(err.value).splitlines()
    assert lines[0] == "records: 2 problem(s) found before the run started:"
    assert len(lines) == 3 and all(line.startswith("  - records[0] (subject ") for line in lines[1:]), lines
    assert ("tab\tand é" in lines[1]) == (subject == "tab\tand é")  # printable text is kept as it is
