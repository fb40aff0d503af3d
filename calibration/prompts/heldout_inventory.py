"""Keep track of items on shelves, with simple reports."""

import os
import sys


class Shelf:
    """A named shelf holding a number of items."""

    def __init__(self, name, capacity=10):
        self.name = name
        self.capacity = capacity
        self.items = []

    def add(self, item):
        if len(self.items) >= self.capacity:
            raise ValueError("shelf %r is full" % self.name)
        self.items.append(item)

    def remove(self, item):
        try:
            self.items.remove(item)
        except ValueError:
            raise KeyError(item) from None

    def __len__(self):
        return len(self.items)

    def __repr__(self):
        return "<Shelf %s: %d of %d>" % (self.name, len(self.items), self.capacity)


def load_shelves(path):
    """Read shelves from a file with one 'name capacity' pair per line."""
    shelves = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            name, _, capacity = line.partition(" ")
            shelves[name] = Shelf(name, int(capacity or 10))
    return shelves


def report(shelves, file=None):
    if file is None:
        file = sys.stdout
    for name in sorted(shelves):
        shelf = shelves[name]
