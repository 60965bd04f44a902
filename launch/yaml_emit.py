"""A small YAML writer for the Kubernetes manifests the GKE launcher generates, so the project
needs no YAML library: mappings, lists, strings, ints and bools in block style.

A string is written bare only when YAML reads it back as the same string (letters, digits and
`._/-` that do not look like a number, bool or null); any other string is written as a JSON
string, which YAML reads as the same double-quoted scalar. So `dump(x)` parses back to `x`.
"""
import json
import re
from typing import Any

# YAML 1.1 (what Kubernetes' parser follows) reads these bare words as bools or null.
_RESERVED = {"y", "yes", "n", "no", "true", "false", "on", "off", "null", "~", ""}
_BARE = re.compile(r"[A-Za-z_/][A-Za-z0-9_./-]*")
_NUMBER_LIKE = re.compile(r"[-+]?(\.[0-9]|[0-9]).*|\.inf|\.nan", re.IGNORECASE)


def scalar(value: Any) -> str:
  if isinstance(value, bool):
    return "true" if value else "false"
  if isinstance(value, int):
    return str(value)
  if isinstance(value, str):
    bare = (_BARE.fullmatch(value) and value.lower() not in _RESERVED
            and not _NUMBER_LIKE.fullmatch(value))
    return value if bare else json.dumps(value)
  raise TypeError(f"cannot write {type(value).__name__} {value!r} as YAML")


def _lines(value: Any, indent: int) -> list[str]:
  pad = " " * indent
  if isinstance(value, dict):
    if not value:
      return [pad + "{}"]
    out = []
    for key, item in value.items():
      key_text = scalar(str(key))
      if isinstance(item, (dict, list)) and item:
        out.append(f"{pad}{key_text}:")
        # A list under a key is indented like its key's siblings' children.
        out += _lines(item, indent + 2)
      else:
        out.append(f"{pad}{key_text}: {_inline(item)}")
    return out
  if isinstance(value, list):
    if not value:
      return [pad + "[]"]
    out = []
    for item in value:
      if isinstance(item, (dict, list)) and item:
        first, *rest = _lines(item, indent + 2)
        out.append(f"{pad}- {first[indent + 2:]}")
        out += rest
      else:
        out.append(f"{pad}- {_inline(item)}")
    return out
  return [pad + scalar(value)]


def _inline(value: Any) -> str:
  if isinstance(value, dict):
    return "{}"
  if isinstance(value, list):
    return "[]"
  return scalar(value)


def dump(value: Any) -> str:
  """`value` (dicts, lists, str, int, bool) as a block-style YAML document."""
  return "\n".join(_lines(value, 0)) + "\n"
