"""The public HTTP cache test suite (npm http-cache-tests, netns_lab/cache_conformance.py)
against `nfsplice http --cache-dir` as a reverse proxy, in the lab.

Its score goes to the CI log whether the test passes or not.  The floor: 140 of the
package's required tests, and no failure at all in the groups where a wrong answer
leaks or serves what must not be served (no-store, private, Authorization, Vary) or
serves outdated data (304 updates, invalidation).
"""
from __future__ import annotations

import pytest

from netns_lab import cache_conformance as cc

pytestmark = pytest.mark.root

MIN_REQUIRED_PASSED = 140


def test_http_cache_tests_score(capsys):
    test_list, results, stderr = cc.run()
    sc = cc.score(test_list, results)
    with capsys.disabled():
        print("\n" + cc.report(test_list, results, sc), flush=True)
    assert sc["required"]["untested"] == 0, f"the suite did not run every test: {stderr[-2000:]}"
    assert sc["passed"] >= MIN_REQUIRED_PASSED, f"{sc['passed']} of {sc['total_required']} required tests passed"
    failed_groups = {g: ids for g, ids in sc["groups"].items() if ids}
    assert not failed_groups, failed_groups
