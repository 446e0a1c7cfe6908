"""The command-line surface is pinned: every flag and every flagfile's config.

`tests/config_golden.json` holds, from the code before config.py declared each
field once, (1) every flag's name, kind, type, default, help and enum values
(what `--helpfull` prints), plus the help text itself, and (2) the resolved
config JSON (what `--dry_run` prints) of every flagfile in flags/. A change to
either is a change of the command-line contract: make it on purpose and
regenerate with

  SUPCON_REGEN_GOLDEN=1 python -m pytest tests/config_golden_test.py

Runs in-process (no TensorFlow is imported by config.py): about 1 s.
"""

import glob
import json
import os

from absl import flags
import pytest

from supcon_tf import config as config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GOLDEN = os.path.join(ROOT, 'tests', 'config_golden.json')


def _flag_values() -> flags.FlagValues:
  fv = flags.FlagValues()
  config_lib.define_flags(fv)
  return fv


def _describe_flags(fv: flags.FlagValues):
  out = {}
  for name in sorted(fv):
    flag = fv[name]
    parser = flag.parser
    out[name] = {
        'class': type(flag).__name__,
        'type': flag.flag_type(),
        'parser': type(parser).__name__,
        'default': repr(flag.default),
        'default_as_str': flag.default_as_str,
        'help': flag.help,
        'short_name': flag.short_name,
        'boolean': flag.boolean,
        'enum_values': list(getattr(parser, 'enum_values', None) or []) or
                       list(getattr(flag, 'valid_values', None) or []),
        'enum_class': getattr(getattr(parser, 'enum_class', None),
                              '__name__', None),
        'case_sensitive': getattr(parser, 'case_sensitive', None),
    }
  return out


def _dry_runs(monkeypatch):
  monkeypatch.chdir(ROOT)  # Nested --flagfile= lines are relative to the root.
  out = {}
  for path in sorted(glob.glob(os.path.join('flags', '**', '*.cfg'),
                               recursive=True)):
    fv = _flag_values()
    fv(['supcon_tf', f'--flagfile={path}'])
    # What `main --dry_run` prints.
    out[path] = json.loads(config_lib.config_from_flags(fv).to_json())
  return out


def _current(monkeypatch):
  fv = _flag_values()
  fv(['supcon_tf'])
  return {
      'flags': _describe_flags(fv),
      'help': fv.get_help(include_special_flags=False),
      'dry_run': _dry_runs(monkeypatch),
  }


def test_flags_and_flagfile_configs_are_unchanged(monkeypatch):
  current = _current(monkeypatch)
  if os.environ.get('SUPCON_REGEN_GOLDEN'):
    with open(GOLDEN, 'w') as f:
      json.dump(current, f, indent=1, sort_keys=True)
      f.write('\n')
    pytest.skip('regenerated ' + GOLDEN)
  with open(GOLDEN) as f:
    golden = json.load(f)
  assert sorted(current['flags']) == sorted(golden['flags'])
  for name, want in golden['flags'].items():
    assert current['flags'][name] == want, name
  assert current['help'] == golden['help']
  assert sorted(current['dry_run']) == sorted(golden['dry_run'])
  for path, want in golden['dry_run'].items():
    assert current['dry_run'][path] == want, path
  # Every flagfile resolves (a file that stopped parsing would show above).
  assert len(golden['dry_run']) >= 25
