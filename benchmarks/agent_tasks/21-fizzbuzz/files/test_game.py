import unittest

from game import fizzbuzz


class TestGame(unittest.TestCase):
    def test_plain(self):
        self.assertEqual(fizzbuzz(1), "1")

    def test_fizz_buzz(self):
        self.assertEqual(fizzbuzz(3), "Fizz")
        self.assertEqual(fizzbuzz(5), "Buzz")

    def test_fizzbuzz(self):
        self.assertEqual(fizzbuzz(15), "FizzBuzz")


if __name__ == "__main__":
    unittest.main()
