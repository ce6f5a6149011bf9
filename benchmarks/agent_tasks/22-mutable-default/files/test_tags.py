import unittest

from tags import add_tag


class TestTags(unittest.TestCase):
    def test_fresh_lists(self):
        self.assertEqual(add_tag("a"), ["a"])
        self.assertEqual(add_tag("b"), ["b"])


if __name__ == "__main__":
    unittest.main()
