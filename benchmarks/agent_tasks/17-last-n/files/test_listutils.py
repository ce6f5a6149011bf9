import unittest

from listutils import chunks, last_n


class TestListUtils(unittest.TestCase):
    def test_last_two(self):
        self.assertEqual(last_n([1, 2, 3, 4], 2), [3, 4])

    def test_last_one(self):
        self.assertEqual(last_n(["a", "b", "c"], 1), ["c"])

    def test_chunks(self):
        self.assertEqual(chunks([1, 2, 3, 4, 5], 2), [[1, 2], [3, 4], [5]])


if __name__ == "__main__":
    unittest.main()
