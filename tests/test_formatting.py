from cxr.formatting import interval, num


def test_negative_ends_use_a_minus_sign_and_intervals_read_to():
    assert interval(-0.0381, -0.0104) == "\u22120.038 to \u22120.010"
    assert interval(-0.6, 1.0) == "\u22120.600 to 1.000"


def test_figures_are_rounded_and_missing_ones_read_na():
    assert num(0.91234567890123) == "0.912"
    assert num(0.5, 1) == "0.5"
    assert num(float("nan")) == "n/a"
    assert num(None) == "n/a"
    assert num(-0.0001) == "0.000"
