import unittest

from textutils import initials, slugify


class TestText(unittest.TestCase):
    def test_slugify(self):
        self.assertEqual(slugify("Hello, World!"), "hello-world")

    def test_initials(self):
        self.assertEqual(initials("Ada Lovelace"), "AL")


if __name__ == "__main__":
    unittest.main()
