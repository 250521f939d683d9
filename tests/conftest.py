import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


@pytest.fixture(autouse=True)
def _root_tests_need_root(request):
    """Tests marked root run here as root; anywhere else they fail loudly, never skip."""
    if request.node.get_closest_marker("root") and os.geteuid() != 0:
        pytest.fail("this test needs root (network namespaces, iptables, NFQUEUE, TCP_REPAIR)")
