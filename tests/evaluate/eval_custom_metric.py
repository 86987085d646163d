"""A custom metric module for the "module:function" tests."""

NOT_A_FUNCTION = 3


def first_word_match(prediction: str, reference: str) -> float:
    p, r = prediction.split(), reference.split()
    return float(bool(p) and bool(r) and p[0].lower() == r[0].lower())


def broken(prediction: str, reference: str):
    return "high"
