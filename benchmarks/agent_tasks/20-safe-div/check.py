"""20-safe-div: shipped tests of mathutils plus hidden safe_div cases (custom default, float result, zero numerator)"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _checklib import args, run_tests

HIDDEN = """\
import unittest

from mathutils import safe_div


class TestHidden(unittest.TestCase):
    def test_more_divs(self):
        self.assertEqual(safe_div(1, 0, default=0), 0)
        self.assertEqual(safe_div(5, 0, default="n/a"), "n/a")
        self.assertEqual(safe_div(7, 2), 3.5)
        self.assertEqual(safe_div(0, 5), 0)
"""

workdir, _ = args()
run_tests(workdir, __file__, ["test_mathutils.py"], HIDDEN)
