"""Budget strings mean exactly what the spec says, and bad ones name the accepted forms."""
import pytest

from d3codec.errors import BudgetError
from d3codec.format.budget import check_budget, parse_budget

IMAGENET64 = (1000, (3, 64, 64))


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("2ipc", 98_304_000),  # the example: 2 x 1000 x 3 x 64 x 64 x 4
        ("1ipc", 49_152_000),
        ("2ipc-u8", 24_576_000),
        ("0.5ipc", 24_576_000),
        ("250000", 250_000),
        (250000, 250_000),
        ("500KB", 500_000),
        ("500kb", 500_000),
        ("1.5MiB", 1_572_864),
        ("2MB", 2_000_000),
        ("1GiB", 1 << 30),
        ("1 GB", 10**9),
        ("10B", 10),
        ("1.0001KB", 1000),  # fractional bytes round down: a budget is a ceiling
    ],
)
def test_budget_values(spec, expected):
    assert parse_budget(spec, *IMAGENET64).bytes == expected


def test_budget_records_how_it_was_given():
    b = parse_budget(" 2ipc-u8 ", 10, (1, 28, 28))
    assert (b.bytes, b.unit, b.ipc, b.spec) == (2 * 10 * 28 * 28, "ipc-u8", 2.0, "2ipc-u8")
    b = parse_budget("1.5MiB", 10, (1, 28, 28))
    assert (b.unit, b.ipc, b.spec) == ("bytes", None, "1.5MiB")


def test_fractional_ipc_is_exact():
    # 0.1 x 10 x 1 x 28 x 28 x 4 = 3136 exactly (no float rounding to 3135)
    assert parse_budget("0.1ipc", 10, (1, 28, 28)).bytes == 3136


@pytest.mark.parametrize("spec", ["", "x", "2 ipcs", "-1", "0", "0ipc", "1e6", "2ipc-u16", "KB", "1.2.3MB", True, 0, -5, 2.5])
def test_bad_budgets_name_the_accepted_forms(spec):
    with pytest.raises(BudgetError) as err:
        parse_budget(spec, 10, (1, 28, 28))
    assert "\n" not in str(err.value)
    assert "ipc" in str(err.value) or "positive" in str(err.value)


def test_ipc_needs_a_known_shape():
    with pytest.raises(BudgetError, match="byte size"):
        parse_budget("1ipc", 0, (1, 28, 28))


@pytest.mark.parametrize("spec", ["3 apples", "ipc", "0ipc", "0", "0KB", "-1", 0, -5, 2.5])
def test_check_budget_refuses_what_no_dataset_makes_sense_of(spec) -> None:
    with pytest.raises(BudgetError):
        check_budget(spec)


@pytest.mark.parametrize("spec", ["1ipc", "0.5ipc", "2ipc-u8", "31360", "500KB", "1.5MiB", 31360])
def test_check_budget_accepts_every_documented_form(spec) -> None:
    check_budget(spec)
