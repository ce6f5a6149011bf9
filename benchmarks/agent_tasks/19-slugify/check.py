"""19-slugify: shipped tests of textutils plus hidden slugify cases (mixed case, digits, punctuation)"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _checklib import args, run_tests

HIDDEN = """\
import unittest

from textutils import slugify


class TestHidden(unittest.TestCase):
    def test_more_slugs(self):
        self.assertEqual(slugify("API v2 Release"), "api-v2-release")
        self.assertEqual(slugify("  Top 10 TIPS -- for You  "), "top-10-tips-for-you")
        self.assertEqual(slugify("already-a-slug"), "already-a-slug")
"""

workdir, _ = args()
run_tests(workdir, __file__, ["test_textutils.py"], HIDDEN)
