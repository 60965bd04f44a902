"""launch.yaml_emit: strings YAML would misread are quoted, the block layout is what
Kubernetes manifests look like, and (where PyYAML is installed) every document parses back."""
import pytest

from launch import yaml_emit


@pytest.mark.parametrize("value, text", [
    ("tpu-v5-lite-podslice", "tpu-v5-lite-podslice"),
    ("google.com/tpu", "google.com/tpu"),
    ("4x4", '"4x4"'),  # starts like a number
    ("8", '"8"'),
    ("1e3", '"1e3"'),
    ("no", '"no"'),  # YAML 1.1 reads yes/no/on/off as bools
    ("On", '"On"'),
    ("null", '"null"'),
    ("", '""'),
    ("-c", '"-c"'),
    ("a: b", '"a: b"'),
    ("#x", '"#x"'),
    ('say "hi" $(X)', '"say \\"hi\\" $(X)"'),
    ("two\nlines", '"two\\nlines"'),
    (8, "8"),
    (True, "true"),
])
def test_scalars(value, text):
  assert yaml_emit.scalar(value) == text


def test_block_layout():
  doc = {"metadata": {"name": "a"},
         "containers": [{"name": "c", "command": ["python", "-m"], "env": []}],
         "empty": {}}
  assert yaml_emit.dump(doc) == (
      "metadata:\n"
      "  name: a\n"
      "containers:\n"
      "  - name: c\n"
      "    command:\n"
      "      - python\n"
      '      - "-m"\n'
      "    env: []\n"
      "empty: {}\n")


def test_unsupported_values_are_refused():
  with pytest.raises(TypeError, match="float"):
    yaml_emit.dump({"x": 1.5})


def test_parses_back():
  yaml = pytest.importorskip("yaml")  # not a dependency; checked where it is installed
  doc = {"a": [{"b": ["yes", "1.5", "x y", "ünï", "$$(X)", "a\nb", 3, False, [], {}]},
               [["nested"]]],
         "y": {"n": "~"}}
  assert yaml.safe_load(yaml_emit.dump(doc)) == doc
