import unittest

from people import by_age, names


class TestPeople(unittest.TestCase):
    def test_by_age(self):
        people = [{"name": "Ann", "age": 41}, {"name": "Bo", "age": 19}, {"name": "Cy", "age": 30}]
        self.assertEqual(names(by_age(people)), ["Bo", "Cy", "Ann"])


if __name__ == "__main__":
    unittest.main()
