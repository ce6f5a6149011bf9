"""22-mutable-default: shipped tests of tags plus a hidden test: calls without a list start empty, a given list is extended"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _checklib import args, run_tests

HIDDEN = """\
import unittest

from tags import add_tag


class TestHidden(unittest.TestCase):
    def test_given_list(self):
        self.assertEqual(add_tag("y", ["x"]), ["x", "y"])
        self.assertEqual(add_tag("z"), ["z"])
        self.assertEqual(add_tag("w"), ["w"])
"""

workdir, _ = args()
run_tests(workdir, __file__, ["test_tags.py"], HIDDEN)
