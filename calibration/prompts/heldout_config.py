"""Parse a small configuration format of sections and key = value lines."""

import re

_SECTION = re.compile(r"^\[(?P<name>[^\]]+)\]$")
_OPTION = re.compile(r"^(?P<key>[\w.-]+)\s*=\s*(?P<value>.*)$")


class ParseError(Exception):
    def __init__(self, lineno, line):
        self.lineno = lineno
        self.line = line
        super().__init__("line %d: cannot parse %r" % (lineno, line))


def parse(text):
    """Return a dict of sections, each a dict of options."""
    sections = {}
    current = None
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        m = _SECTION.match(line)
        if m:
            current = sections.setdefault(m.group("name"), {})
            continue
        m = _OPTION.match(line)
        if m is None or current is None:
            raise ParseError(lineno, line)
        current[m.group("key")] = m.group("value").strip()
    return sections


def get_int(sections, section, key, default=None):
    try:
        value = sections[section][key]
    except KeyError:
        if default is None:
            raise
        return default
    return int(value)


def get_bool(sections, section, key, default=False):
    value = sections.get(section, {}).get(key)
    if value is None:
        return default
    value = value.lower()
