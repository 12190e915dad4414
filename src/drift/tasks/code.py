"""The `code` task set: small Python functions from a description, judged by unit tests.

Each family below is a description, a function name and a reference solution, most with a
parameter k (add k, the multiples of k, the k-th letter, ...); the tests are `assert` lines whose
expected values come from running the reference solution on fixed inputs here. 300 tasks in all;
the train/test split is a fixed hash of the task id (`split_of`), as for every task source.

A user's own code tasks are JSONL rows with `description`, `entry_point` and `tests` (a list of
Python statements, usually asserts), optionally `id` and `solution` (`drift.tasks.loader`).
"""

from __future__ import annotations

import random
from typing import Any

from drift import DriftError
from drift.tasks.problem import Problem, split_of

NAME = "code"

# (entry point, description, solution body, parameter values, test inputs); "{k}" is the parameter
_FAMILIES: list[tuple[str, str, str, list[Any], list[tuple]]] = [
    ("add_{k}", "returns the integer x plus {k}", "def add_{k}(x):\n    return x + {k}\n",
     list(range(1, 31)), [(0,), (5,), (-3,), (100,)]),
    ("subtract_{k}", "returns the integer x minus {k}", "def subtract_{k}(x):\n    return x - {k}\n",
     list(range(1, 31)), [(0,), (50,), (-2,), (7,)]),
    ("times_{k}", "returns x multiplied by {k}", "def times_{k}(x):\n    return x * {k}\n",
     list(range(2, 21)), [(0,), (3,), (-4,), (11,)]),
    ("divisible_by_{k}", "returns True if the integer n is divisible by {k}, else False",
     "def divisible_by_{k}(n):\n    return n % {k} == 0\n", list(range(2, 21)), [(0,), (7,), (60,), (121,), (-40,)]),
    ("mod_{k}", "returns the remainder of the non-negative integer x divided by {k}",
     "def mod_{k}(x):\n    return x % {k}\n", list(range(2, 13)), [(0,), (17,), (100,), (5,)]),
    ("floor_div_{k}", "returns the non-negative integer x divided by {k}, rounded down",
     "def floor_div_{k}(x):\n    return x // {k}\n", list(range(2, 13)), [(0,), (17,), (100,), (5,)]),
    ("power_{k}", "returns x raised to the power {k}", "def power_{k}(x):\n    return x ** {k}\n",
     list(range(2, 7)), [(0,), (2,), (-3,), (5,)]),
    ("count_letter_{k}", "returns how many times the letter '{k}' occurs in the string s",
     "def count_letter_{k}(s):\n    return s.count('{k}')\n", list("abcdefghijklmnopqrstuvwxyz"),
     [("",), ("banana",), ("the quick brown fox jumps over the lazy dog",), ("mississippi",)]),
    ("repeat_{k}", "returns the string s repeated {k} times", "def repeat_{k}(s):\n    return s * {k}\n",
     list(range(2, 10)), [("",), ("ab",), ("x",)]),
    ("add_{k}_to_each", "returns a new list with {k} added to every number of the list xs",
     "def add_{k}_to_each(xs):\n    return [x + {k} for x in xs]\n", list(range(1, 11)), [([],), ([1, 2, 3],), ([-5, 0],)]),
    ("greater_than_{k}", "returns the numbers of the list xs that are greater than {k}, in their order",
     "def greater_than_{k}(xs):\n    return [x for x in xs if x > {k}]\n", list(range(0, 11)),
     [([],), ([1, 5, 10, 3, 8],), ([11, 0, 7, 2],)]),
    ("count_multiples_of_{k}", "returns how many numbers of the list xs are multiples of {k}",
     "def count_multiples_of_{k}(xs):\n    return sum(1 for x in xs if x % {k} == 0)\n", list(range(2, 11)),
     [([],), ([1, 2, 3, 4, 5, 6, 7, 8, 9, 10],), ([12, 24, 35],)]),
    ("last_{k}_chars", "returns the last {k} characters of the string s (all of s if it is shorter)",
     "def last_{k}_chars(s):\n    return s[-{k}:]\n", list(range(1, 7)), [("",), ("hello world",), ("abc",)]),
    ("first_{k}", "returns the first {k} elements of the list xs (all of xs if it is shorter)",
     "def first_{k}(xs):\n    return xs[:{k}]\n", list(range(1, 7)), [([],), ([1, 2, 3, 4, 5, 6, 7, 8],), ([9, 8],)]),
    ("sum_multiples_{k}", "returns the sum of all positive multiples of {k} that are smaller than n",
     "def sum_multiples_{k}(n):\n    return sum(range({k}, n, {k}))\n", list(range(2, 13)), [(1,), (10,), (50,), (100,)]),
    ("words_longer_than_{k}", "returns how many words (separated by spaces) of the string s have more than {k} letters",
     "def words_longer_than_{k}(s):\n    return sum(1 for w in s.split() if len(w) > {k})\n", list(range(2, 7)),
     [("",), ("a bb ccc dddd eeeee ffffff ggggggg",), ("the quick brown fox jumps",)]),
    ("pad_zeros_{k}", "returns the non-negative integer n as a string, padded with leading zeros to at least {k} characters",
     "def pad_zeros_{k}(n):\n    return str(n).zfill({k})\n", list(range(3, 9)), [(0,), (42,), (123456789,)]),
    ("rotate_left_{k}", "returns the list xs rotated left by {k} positions (xs[{k}:] followed by xs[:{k}], "
     "with {k} taken modulo the length; an empty list stays empty)",
     "def rotate_left_{k}(xs):\n    if not xs:\n        return []\n    r = {k} % len(xs)\n    return xs[r:] + xs[:r]\n",
     list(range(1, 5)), [([],), ([1, 2, 3, 4, 5],), ([7, 8],)]),
    ("shift_letters_{k}", "returns the lowercase string s with every letter shifted {k} places forward in the "
     "alphabet, wrapping from z to a (other characters unchanged)",
     "def shift_letters_{k}(s):\n    return ''.join(chr((ord(c) - 97 + {k}) % 26 + 97) if 'a' <= c <= 'z' else c for c in s)\n",
     list(range(1, 6)), [("",), ("abc",), ("xyz",), ("hello world",)]),
    ("is_power_of_{k}", "returns True if the positive integer n is a power of {k} (1 counts as {k} to the power 0)",
     "def is_power_of_{k}(n):\n    while n % {k} == 0 and n > 1:\n        n //= {k}\n    return n == 1\n",
     list(range(2, 6)), [(1,), (8,), (9,), (16,), (25,), (30,)]),
    ("contains_digit_{k}", "returns True if the decimal digits of the non-negative integer n include the digit {k}",
     "def contains_digit_{k}(n):\n    return '{k}' in str(n)\n", list(range(10)), [(0,), (1234567,), (808,), (95,)]),
    ("multiply_each_by_{k}", "returns a new list with every number of the list xs multiplied by {k}",
     "def multiply_each_by_{k}(xs):\n    return [x * {k} for x in xs]\n", list(range(2, 11)), [([],), ([1, 2, 3],), ([-1, 0],)]),
    ("at_most_{k}", "returns the number x, or {k} if x is larger than {k}",
     "def at_most_{k}(x):\n    return min(x, {k})\n", list(range(1, 16)), [(0,), (8,), (20,), (-3,)]),
    ("replace_{k}", "returns the string s with every '{k}' replaced by '*'",
     "def replace_{k}(s):\n    return s.replace('{k}', '*')\n", list("aeiou"), [("",), ("education",), ("banana split",)]),
]
# families without a parameter: (entry point, description, solution, test inputs)
_SINGLES: list[tuple[str, str, str, list[tuple]]] = [
    ("reverse_string", "returns the string s reversed", "def reverse_string(s):\n    return s[::-1]\n",
     [("",), ("abc",), ("racecar",), ("hello",)]),
    ("is_palindrome", "returns True if the string s reads the same forwards and backwards",
     "def is_palindrome(s):\n    return s == s[::-1]\n", [("",), ("abba",), ("abc",), ("racecar",)]),
    ("count_vowels", "returns how many vowels (a, e, i, o, u, lower case) the string s has",
     "def count_vowels(s):\n    return sum(c in 'aeiou' for c in s)\n", [("",), ("banana",), ("rhythm",), ("education",)]),
    ("factorial", "returns n! for a non-negative integer n",
     "def factorial(n):\n    out = 1\n    for i in range(2, n + 1):\n        out *= i\n    return out\n", [(0,), (1,), (5,), (10,)]),
    ("fibonacci", "returns the n-th Fibonacci number, with fibonacci(0) = 0 and fibonacci(1) = 1",
     "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n",
     [(0,), (1,), (2,), (10,), (20,)]),
    ("largest", "returns the largest number of the non-empty list xs", "def largest(xs):\n    return max(xs)\n",
     [([3],), ([1, 5, 2],), ([-4, -2, -9],)]),
    ("smallest", "returns the smallest number of the non-empty list xs", "def smallest(xs):\n    return min(xs)\n",
     [([3],), ([1, 5, 2],), ([-4, -2, -9],)]),
    ("digit_sum", "returns the sum of the decimal digits of the non-negative integer n",
     "def digit_sum(n):\n    return sum(int(d) for d in str(n))\n", [(0,), (7,), (1234,), (9999,)]),
    ("is_prime", "returns True if the integer n is a prime number",
     "def is_prime(n):\n    if n < 2:\n        return False\n    i = 2\n    while i * i <= n:\n        if n % i == 0:\n"
     "            return False\n        i += 1\n    return True\n", [(0,), (1,), (2,), (9,), (13,), (97,)]),
    ("gcd", "returns the greatest common divisor of the positive integers a and b",
     "def gcd(a, b):\n    while b:\n        a, b = b, a % b\n    return a\n", [(12, 18), (7, 5), (100, 75)]),
    ("lcm", "returns the least common multiple of the positive integers a and b",
     "def lcm(a, b):\n    x, y = a, b\n    while y:\n        x, y = y, x % y\n    return a * b // x\n", [(4, 6), (7, 5), (10, 10)]),
    ("word_count", "returns the number of words (separated by whitespace) in the string s",
     "def word_count(s):\n    return len(s.split())\n", [("",), ("one",), ("the quick  brown fox",)]),
    ("capitalize_words", "returns the string s with the first letter of every space-separated word in upper case "
     "and the rest unchanged", "def capitalize_words(s):\n    return ' '.join(w[:1].upper() + w[1:] for w in s.split(' '))\n",
     [("",), ("hello world",), ("a bC d",)]),
    ("remove_duplicates", "returns the elements of the list xs without repeats, each at its first position",
     "def remove_duplicates(xs):\n    seen, out = set(), []\n    for x in xs:\n        if x not in seen:\n"
     "            seen.add(x)\n            out.append(x)\n    return out\n", [([],), ([1, 2, 1, 3, 2],), ([5, 5, 5],)]),
    ("second_largest", "returns the second largest distinct number of the list xs (which has at least two distinct numbers)",
     "def second_largest(xs):\n    return sorted(set(xs))[-2]\n", [([1, 2],), ([5, 1, 5, 3],), ([-1, -7, -3],)]),
    ("running_sum", "returns the list of running totals of the list xs (the i-th is the sum of xs[0..i])",
     "def running_sum(xs):\n    out, total = [], 0\n    for x in xs:\n        total += x\n        out.append(total)\n    return out\n",
     [([],), ([1, 2, 3],), ([5, -5, 5],)]),
    ("flatten_once", "returns one list holding the elements of every list in the list of lists xss, in order",
     "def flatten_once(xss):\n    return [x for xs in xss for x in xs]\n", [([],), ([[1], [2, 3], []],), ([[4, 5], [6]],)]),
    ("celsius_to_fahrenheit", "returns the temperature c (degrees Celsius) in degrees Fahrenheit: c * 9 / 5 + 32",
     "def celsius_to_fahrenheit(c):\n    return c * 9 / 5 + 32\n", [(0,), (100,), (-40,), (37,)]),
    ("absolute_difference", "returns the absolute difference of the numbers a and b",
     "def absolute_difference(a, b):\n    return abs(a - b)\n", [(3, 5), (5, 3), (-2, 2)]),
    ("is_sorted", "returns True if the list xs is in non-decreasing order",
     "def is_sorted(xs):\n    return all(a <= b for a, b in zip(xs, xs[1:]))\n", [([],), ([1, 2, 2, 5],), ([3, 1],)]),
    ("digits", "returns the list of the decimal digits of the non-negative integer n, most significant first",
     "def digits(n):\n    return [int(d) for d in str(n)]\n", [(0,), (5,), (1203,)]),
    ("swap_case", "returns the string s with upper-case letters made lower case and lower-case letters upper case",
     "def swap_case(s):\n    return s.swapcase()\n", [("",), ("Hello World",), ("abc",)]),
    ("sum_of_squares", "returns 1*1 + 2*2 + ... + n*n for a non-negative integer n",
     "def sum_of_squares(n):\n    return sum(i * i for i in range(1, n + 1))\n", [(0,), (1,), (3,), (10,)]),
    ("count_positive", "returns how many numbers of the list xs are greater than zero",
     "def count_positive(xs):\n    return sum(1 for x in xs if x > 0)\n", [([],), ([1, -2, 3, 0],), ([-1, -5],)]),
    ("mean", "returns the arithmetic mean of the non-empty list of numbers xs", "def mean(xs):\n    return sum(xs) / len(xs)\n",
     [([2],), ([1, 2, 3, 4],), ([-3, 3],)]),
]


def _tasks() -> list[tuple[str, str, str, list[str]]]:
    """Every task: (entry point, description, reference solution, tests), tests computed from the solution."""
    out = []
    rows = [(e.replace("{k}", str(k)), d.replace("{k}", str(k)), s.replace("{k}", str(k)), inputs)
            for e, d, s, ks, inputs in _FAMILIES for k in ks]
    for entry, description, solution, inputs in rows + _SINGLES:
        namespace: dict[str, Any] = {}
        exec(solution, namespace)  # our own reference code, to compute the expected values
        fn = namespace[entry]
        tests = [f"assert {entry}({', '.join(map(repr, args))}) == {fn(*args)!r}" for args in inputs]
        out.append((entry, f"Write a Python function `{entry}` that {description}.", solution, tests))
    return out


def code_problem(entry: str, description: str, tests: list[str], solution: str = "", task_id: str | None = None,
                 metadata: dict[str, Any] | None = None) -> Problem:
    """A code task as a problem: the description is the question, the reference solution (if any) the gold."""
    return Problem(id=task_id or f"code-{entry}", question=description, answer=solution, checker="exact", extract="full",
                   metadata={**(metadata or {}), "entry_point": entry, "tests": list(tests)})


def generate_code(num: int | None, seed: int, split: str) -> list[Problem]:
    """`num` code tasks of `split` (train | test | all), drawn by `seed`."""
    pool = [t for t in _tasks() if split == "all" or split_of(f"code-{t[0]}") == split]
    if num is None:
        num = len(pool)
    if num > len(pool):
        raise DriftError(f"{NAME}: asked for {num} problems but the {split} split has only {len(pool)}")
    chosen = random.Random(f"{NAME}:{seed}").sample(pool, num)
    return [code_problem(entry, description, tests, solution) for entry, description, solution, tests in chosen]
