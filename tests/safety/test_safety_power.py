"""The gate's statistics: exact bounds and power against hand-worked binomial figures, and seeded simulations
showing that the gate finds a true 10-point drop on 110 paired probes as often as it says it will, and that the
default probe sets (510 harmful probes) find a 5-point drop with at least 80% power under the stated assumption."""

import numpy as np
import pytest

from tunesmith.safety.gate import Limits, decide
from tunesmith.safety.power import (binom_sf, clopper_pearson, critical_count, detectable_drop, paired_bound,
                                    power)


def test_critical_counts_by_hand():
    # P(Bin(5, 1/2) >= 5) = 1/32 = 0.031 <= 0.05, P(>= 4) = 6/32 = 0.19
    assert critical_count(5, 0.05) == 5
    assert critical_count(4, 0.05) is None  # 1/16 = 0.0625: four discordant pairs can never show a drop
    # P(Bin(10, 1/2) >= 9) = 11/1024 = 0.011, P(>= 8) = 56/1024 = 0.055
    assert critical_count(10, 0.05) == 9
    assert binom_sf(8, 10, 0.5) == pytest.approx(56 / 1024)


def test_clopper_pearson_by_hand():
    # all k = n: the lower bound solves p**n = alpha; k = 0: the upper bound solves (1 - p)**n = alpha
    assert clopper_pearson(5, 5, 0.05) == pytest.approx((0.05 ** (1 / 5), 1.0), abs=1e-8)
    assert clopper_pearson(0, 10, 0.05) == pytest.approx((0.0, 1 - 0.05 ** (1 / 10)), abs=1e-8)
    lo, hi = clopper_pearson(3, 10, 0.05)
    assert binom_sf(3, 10, lo) == pytest.approx(0.05, abs=1e-8) and 1 - binom_sf(4, 10, hi) == pytest.approx(0.05, abs=1e-8)


def test_paired_bound_by_hand():
    # 11 of 110 stopped refusing, none became: psi = 0.1, pi_low = 0.05 ** (1/11) = 0.7616
    b = paired_bound(110, 11, 0, 0.05)
    assert b.drop_points == 10.0 and b.high_points == 10.0
    assert b.low_points == pytest.approx(10 * (2 * 0.05 ** (1 / 11) - 1), abs=0.01)  # 5.23
    # no discordant pairs: the models answered alike, the change is 0 both ways
    b = paired_bound(110, 0, 0, 0.05)
    assert (b.drop_points, b.low_points, b.high_points) == (0.0, 0.0, 0.0)
    # the lower bound is above 0 exactly when the exact McNemar test rejects
    assert paired_bound(110, 5, 0, 0.05).low_points > 0 and paired_bound(110, 4, 0, 0.05).low_points < 0
    assert paired_bound(110, 9, 1, 0.05).low_points > 0 and paired_bound(110, 8, 2, 0.05).low_points < 0


def test_power_by_hand():
    # n = 10, true drop 50 points with no other change: psi = 0.5, every discordant pair a lost refusal.
    # Rejected iff m >= 5 (critical counts 5, 6, 7, 7, 8, 9 for m = 5..10, all reached when s = m):
    # P(Bin(10, 1/2) >= 5) = 638/1024
    assert power(10, 0.0, 0.5, 0.05) == pytest.approx(638 / 1024)
    assert power(4, 0.0, 1.0, 0.05) == 0.0 and detectable_drop(4, 0.0, 0.05) is None
    # more discordance means less power for the same drop
    assert power(110, 0.1, 0.1, 0.05) > power(110, 0.2, 0.1, 0.05) > power(110, 0.3, 0.1, 0.05)
    d = detectable_drop(110, 0.2, 0.05)
    assert power(110, 0.2, d, 0.05) >= 0.8 > power(110, 0.2, d - 0.002, 0.05)


def report(pairs, benign=None, cats=None):
    """A safety report from paired counts: pairs = (n, both refused, stopped refusing, became refusals)."""
    def side(n, refused):
        return {"all": {"n": n, "refused": refused, "rate": refused / n}, "by_category": {}}

    def sets(pairs_):
        n, both, s, c = pairs_
        return side(n, both + s), side(n, both + c), {"n": n, "stopped_refusing": s, "became_refusals": c,
                                                      "points": round(100 * (s - c) / n, 2)}
    hb, ht, hc = sets(pairs)
    base, tuned, change = {"harmful": hb}, {"harmful": ht}, {"harmful": hc | {"by_category": cats or {}}}
    if benign:
        base["benign"], tuned["benign"], change["benign"] = sets(benign)
    return {"base": base, "tuned": tuned, "change": change}


def simulate(rng, n, p10, p01, p11):
    """One paired measurement: counts (both refused, stopped, became) from the multinomial."""
    both, s, c, _ = rng.multinomial(n, [p11, p10, p01, 1 - p11 - p10 - p01])
    return int(both), int(s), int(c)


@pytest.mark.parametrize("psi", [0.1, 0.2])
def test_detection_rate_matches_printed_power(psi):
    """A true 10-point drop on 110 paired probes (the shipped harmful set), 2,000 seeded measurements: the
    share the gate blocks matches the power at the true discordance within 3 points, and the mean of the powers
    it prints (each from its own observed discordance) within 4."""
    rng = np.random.default_rng(27)
    d, n = 0.10, 110
    blocked, printed = [], []
    for _ in range(2000):
        both, s, c = simulate(rng, n, (psi + d) / 2, (psi - d) / 2, 0.6)
        dec = decide(report((n, both, s, c)), Limits(max_drop=10.0))
        blocked.append(dec.status == "blocked")
        printed.append(dec.power_at_limit)
    assert abs(np.mean(blocked) - power(n, psi, d, 0.05)) < 0.03
    assert abs(np.mean(blocked) - np.mean(printed)) < 0.04  # printed: from each run's observed discordance


def test_no_change_is_blocked_at_most_alpha():
    rng = np.random.default_rng(1)
    blocked = [decide(report((110, *simulate(rng, 110, 0.1, 0.1, 0.6))), 10.0).status == "blocked"
               for _ in range(2000)]
    assert np.mean(blocked) <= 0.05


def test_default_probe_sets_detect_a_5_point_drop_with_80_percent_power():
    """The issue's bar, computed from the shipped sets (not a hard-coded n) under the assumption the README states
    (probes.POWER_ASSUMPTION: at most 15% of the harmful probes answered differently by base and tuned model)."""
    from tunesmith.config import SafetyConfig
    from tunesmith.safety.measure import default_probes
    from tunesmith.safety.probes import POWER_ASSUMPTION as A

    n = sum(p.set == "harmful" for p in default_probes(None, SafetyConfig().probe_sets))
    assert power(n, A["discordance"], A["drop"], A["alpha"]) >= A["power"]
    assert detectable_drop(n, A["discordance"], A["alpha"], A["power"]) <= A["drop"]
    assert power(110, A["discordance"], A["drop"], A["alpha"]) < A["power"]  # the project's 110 alone could not


def test_simulated_5_point_drop_on_the_default_sets_is_found_as_often_as_power_says():
    """4,000 seeded paired measurements of a true 5-point drop at 15% discordance on 510 probes: the exact test the
    gate blocks on (s at least the critical count of s + c, the same event as its lower bound above 0) rejects as
    often as ``power`` says, and at least 80% of the time."""
    from tunesmith.safety.probes import POWER_ASSUMPTION as A

    rng = np.random.default_rng(5)
    n, psi, d = 510, A["discordance"], A["drop"]
    crit = [critical_count(m, A["alpha"]) for m in range(n + 1)]
    found = []
    for _ in range(4000):
        _, s, c = simulate(rng, n, (psi + d) / 2, (psi - d) / 2, 0.6)
        found.append(crit[s + c] is not None and s >= crit[s + c])
    assert abs(np.mean(found) - power(n, psi, d, A["alpha"])) < 0.02 and np.mean(found) >= 0.8
    # the same event as the gate's bound: with 76 discordant pairs the critical count is 46
    assert critical_count(76, 0.05) == 46
    assert paired_bound(n, 46, 30, 0.05).low_points > 0 >= paired_bound(n, 45, 31, 0.05).low_points
