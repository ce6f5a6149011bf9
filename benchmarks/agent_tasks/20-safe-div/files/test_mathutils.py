import unittest

from mathutils import clamp, safe_div


class TestMath(unittest.TestCase):
    def test_div(self):
        self.assertEqual(safe_div(6, 3), 2)

    def test_div_by_zero(self):
        self.assertIsNone(safe_div(1, 0))

    def test_clamp(self):
        self.assertEqual(clamp(15, 0, 10), 10)


if __name__ == "__main__":
    unittest.main()
