"""21-fizzbuzz: shipped tests of game plus hidden fizzbuzz cases (45, 30, 9, 10, 7)"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _checklib import args, run_tests

HIDDEN = """\
import unittest

from game import fizzbuzz


class TestHidden(unittest.TestCase):
    def test_more(self):
        self.assertEqual([fizzbuzz(n) for n in (45, 30, 9, 10, 7)], ["FizzBuzz", "FizzBuzz", "Fizz", "Buzz", "7"])
"""

workdir, _ = args()
run_tests(workdir, __file__, ["test_game.py"], HIDDEN)
