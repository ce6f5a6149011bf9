"""24-sort-by-age: shipped tests of people plus a hidden test of ascending order with ties kept in input order"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _checklib import args, run_tests

HIDDEN = """\
import unittest

from people import by_age, names


class TestHidden(unittest.TestCase):
    def test_ties_keep_order(self):
        people = [{"name": n, "age": a} for n, a in [("a", 30), ("b", 20), ("c", 30), ("d", 10)]]
        self.assertEqual(names(by_age(people)), ["d", "b", "a", "c"])
"""

workdir, _ = args()
run_tests(workdir, __file__, ["test_people.py"], HIDDEN)
