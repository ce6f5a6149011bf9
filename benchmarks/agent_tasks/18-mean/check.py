"""18-mean: shipped tests of stats plus hidden cases of mean (one value, even count, negatives)"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _checklib import args, run_tests

HIDDEN = """\
import unittest

from stats import mean


class TestHidden(unittest.TestCase):
    def test_more_means(self):
        self.assertEqual(mean([5]), 5)
        self.assertEqual(mean([1, 2, 3, 4]), 2.5)
        self.assertEqual(mean([-3, 3, 6]), 2)
"""

workdir, _ = args()
run_tests(workdir, __file__, ["test_stats.py"], HIDDEN)
