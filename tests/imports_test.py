"""No module of supcon_tf uses a private name of another (DESIGN.md section 1).

Reads the package's sources with `ast` (no import): a `from supcon_tf... import
_name`, or `module._name` where `module` is bound to another supcon_tf module,
is a failure; a helper two modules need becomes public in the lower one.
"""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, 'supcon_tf')


def _private(name):
  return name.startswith('_') and not name.startswith('__')


def _module_name(path):
  rel = os.path.relpath(path, ROOT)[:-len('.py')].replace(os.sep, '.')
  return rel[:-len('.__init__')] if rel.endswith('.__init__') else rel


def _violations(path):
  tree = ast.parse(open(path).read(), path)
  here = _module_name(path)
  package = here if path.endswith('__init__.py') else here.rpartition('.')[0]
  modules = {}  # Local name -> the supcon_tf module it is bound to.
  found = []
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom):
      source = node.module or ''
      if node.level:  # Relative import.
        base = package.split('.')
        base = base[:len(base) - node.level + 1]
        source = '.'.join(base + ([source] if source else []))
      if not source.startswith('supcon_tf'):
        continue
      for alias in node.names:
        if _private(alias.name) and source != here:
          found.append(f'{here}:{node.lineno} imports {source}.{alias.name}')
        modules[alias.asname or alias.name] = f'{source}.{alias.name}'
    elif isinstance(node, ast.Import):
      for alias in node.names:
        if alias.name.startswith('supcon_tf'):
          modules[alias.asname or alias.name] = alias.name
  for node in ast.walk(tree):
    if (isinstance(node, ast.Attribute) and _private(node.attr) and
        isinstance(node.value, ast.Name) and node.value.id in modules and
        modules[node.value.id] != here):
      found.append(f'{here}:{node.lineno} uses {modules[node.value.id]}.'
                   f'{node.attr}')
  return found


def test_no_module_uses_a_private_name_of_another():
  paths = [os.path.join(d, f) for d, _, files in os.walk(PACKAGE)
           for f in files if f.endswith('.py')]
  assert len(paths) > 30
  found = [v for p in sorted(paths) for v in _violations(p)]
  assert not found, '\n'.join(found)


def test_the_check_sees_a_violation(tmp_path):
  bad = tmp_path / 'supcon_tf' / 'x.py'
  bad.parent.mkdir()
  bad.write_text('from supcon_tf.losses import _helper\n'
                 'from supcon_tf import config as c\n'
                 'y = c._coerce\n')
  global ROOT  # pylint: disable=global-statement
  root, ROOT = ROOT, str(tmp_path)
  try:
    found = _violations(str(bad))
  finally:
    ROOT = root
  assert len(found) == 2, found
