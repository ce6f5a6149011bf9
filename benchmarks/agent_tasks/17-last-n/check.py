"""17-last-n: shipped tests of listutils plus hidden cases of last_n (n past the length, n = 0, empty list)"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _checklib import args, run_tests

HIDDEN = """\
import unittest

from listutils import last_n


class TestHidden(unittest.TestCase):
    def test_edges(self):
        self.assertEqual(last_n([1, 2], 5), [1, 2])
        self.assertEqual(last_n([1, 2, 3], 3), [1, 2, 3])
        self.assertEqual(last_n([1, 2, 3], 0), [])
        self.assertEqual(last_n([], 2), [])
        self.assertEqual(last_n(list(range(10)), 4), [6, 7, 8, 9])
"""

workdir, _ = args()
run_tests(workdir, __file__, ["test_listutils.py"], HIDDEN)
