"""23-parse-duration: shipped tests of duration plus hidden parse_duration cases (3h5m, 0h7m, 10h, 2h)"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _checklib import args, run_tests

HIDDEN = """\
import unittest

from duration import parse_duration


class TestHidden(unittest.TestCase):
    def test_more(self):
        self.assertEqual(parse_duration("3h5m"), 185)
        self.assertEqual(parse_duration("0h7m"), 7)
        self.assertEqual(parse_duration("10h"), 600)
        self.assertEqual(parse_duration("2h"), 120)
"""

workdir, _ = args()
run_tests(workdir, __file__, ["test_duration.py"], HIDDEN)
