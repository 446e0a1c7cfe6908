"""Tests of the tpu/ scripts, without Google Cloud.

A fake `gcloud` comes first on PATH. In --dry-run mode it must never be called
(it records any call); the printed commands (`+ ...` lines) must be valid
shell and carry the given TPU name, zone, project, bucket and flagfile. Without
--dry-run a recording fake checks that exactly the printed commands run, and
that launch.sh deletes the TPU it created even when training fails.
"""

import os
import shlex
import stat
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

NAME, ZONE, PROJECT = 'test-tpu', 'europe-west4-a', 'my-project-1'
BUCKET, FLAGFILE = 'gs://my-bucket', 'flags/supcon_cifar10_resnet50.cfg'
LOCATION = [f'--name={NAME}', f'--zone={ZONE}', f'--project={PROJECT}']
EXPERIMENT = [f'--bucket={BUCKET}', f'--flagfile={FLAGFILE}']

# Script -> a complete set of valid options (without --dry-run).
VALID_ARGS = {
    'create_tpu_vm.sh': LOCATION + ['--accelerator-type=v3-8'],
    'delete_tpu_vm.sh': LOCATION,
    'run_experiment.sh': LOCATION + EXPERIMENT,
    'run_pod.sh': LOCATION + EXPERIMENT,
    'launch.sh': LOCATION + EXPERIMENT + ['--accelerator-type=v3-32'],
}

# The fake gcloud: appends its argv (joined by \x1f) to $FAKE_GCLOUD_LOG, and
# exits 1 for a `describe` when FAKE_GCLOUD_NO_TPU is set (the TPU does not
# exist yet), $FAKE_GCLOUD_FAIL_RC when its arguments contain
# $FAKE_GCLOUD_FAIL_ON, and 0 otherwise.
FAKE_GCLOUD = r'''#!/usr/bin/env bash
(IFS=$'\x1f'; printf '%s\n' "$*") >> "$FAKE_GCLOUD_LOG"
if [[ -n ${FAKE_GCLOUD_NO_TPU-} && " $* " == *" describe "* ]]; then exit 1; fi
if [[ -n ${FAKE_GCLOUD_FAIL_ON-} && "$*" == *"$FAKE_GCLOUD_FAIL_ON"* ]]; then
  exit "$FAKE_GCLOUD_FAIL_RC"
fi
exit 0
'''


@pytest.fixture
def fake_gcloud(tmp_path):
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  path = bin_dir / 'gcloud'
  path.write_text(FAKE_GCLOUD)
  path.chmod(path.stat().st_mode | stat.S_IXUSR)
  log = tmp_path / 'gcloud.log'

  def run(script, *args, **env):
    full_env = dict(os.environ, PATH=f'{bin_dir}{os.pathsep}{os.environ["PATH"]}',
                    FAKE_GCLOUD_LOG=str(log), TMPDIR=str(tmp_path),
                    **{k: str(v) for k, v in env.items()})
    return subprocess.run(['bash', os.path.join('tpu', script), *args],
                          cwd=ROOT, env=full_env, capture_output=True,
                          text=True, timeout=120)

  def calls():
    if not log.exists():
      return []
    return [line.split('\x1f') for line in log.read_text().splitlines()]

  run.calls = calls
  return run


def _commands(stdout):
  """The printed commands, each split into argv like a shell would."""
  lines = stdout.splitlines()
  assert lines, 'no commands printed'
  for line in lines:
    assert line.startswith('+ '), f'not a command line: {line!r}'
  return [shlex.split(line[2:]) for line in lines]


def _gcloud_commands(stdout):
  return [c for c in _commands(stdout) if c[0] == 'gcloud']


def _option(argv, name):
  values = [a.split('=', 1)[1] for a in argv if a.startswith(f'--{name}=')]
  assert len(values) == 1, (name, argv)
  return values[0]


@pytest.mark.parametrize('script', sorted(VALID_ARGS))
def test_dry_run_prints_commands_and_runs_nothing(fake_gcloud, script):
  proc = fake_gcloud(script, *VALID_ARGS[script], '--dry-run')
  assert proc.returncode == 0, proc.stderr
  assert fake_gcloud.calls() == []
  gcloud = _gcloud_commands(proc.stdout)
  assert gcloud
  for argv in gcloud:
    assert argv[1:4] == ['compute', 'tpus', 'tpu-vm'], argv
    assert NAME in argv or any(a.startswith(f'{NAME}:') for a in argv), argv
    assert _option(argv, 'zone') == ZONE
    assert _option(argv, 'project') == PROJECT
  if script in ('run_experiment.sh', 'run_pod.sh', 'launch.sh'):
    train = gcloud[-2] if script == 'launch.sh' else gcloud[-1]
    remote = shlex.split(_option(train, 'command'))
    assert f'--flagfile={FLAGFILE}' in remote
    assert f'--model_dir={BUCKET}/supcon_tf/supcon_cifar10_resnet50' in remote
    assert f'--data_dir={BUCKET}/tensorflow_datasets' in remote


def test_create_command(fake_gcloud):
  proc = fake_gcloud('create_tpu_vm.sh', *LOCATION, '--accelerator-type=v3-8',
                     '--spot', '--dry-run')
  assert proc.returncode == 0, proc.stderr
  [argv] = _commands(proc.stdout)
  assert argv == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'create', NAME,
                  f'--zone={ZONE}', f'--project={PROJECT}',
                  '--accelerator-type=v3-8',
                  '--version=tpu-vm-tf-2.16.1-pjrt', '--spot']


@pytest.mark.parametrize('accelerator, version', [
    ('v3-8', 'tpu-vm-tf-2.16.1-pjrt'),
    ('v3-32', 'tpu-vm-tf-2.16.1-pod-pjrt'),
    ('v4-16', 'tpu-vm-tf-2.16.1-pod-pjrt'),
])
def test_default_runtime_follows_the_slice_size(fake_gcloud, accelerator,
                                                version):
  proc = fake_gcloud('create_tpu_vm.sh', *LOCATION,
                     f'--accelerator-type={accelerator}', '--dry-run')
  assert proc.returncode == 0, proc.stderr
  [argv] = _commands(proc.stdout)
  assert _option(argv, 'version') == version


def test_explicit_runtime_version(fake_gcloud):
  proc = fake_gcloud('create_tpu_vm.sh', *LOCATION,
                     '--accelerator-type=v5litepod-8', '--version=my-runtime',
                     '--dry-run')
  assert proc.returncode == 0, proc.stderr
  [argv] = _commands(proc.stdout)
  assert _option(argv, 'version') == 'my-runtime'


def test_single_host_run(fake_gcloud):
  proc = fake_gcloud('run_experiment.sh', *LOCATION, *EXPERIMENT,
                     '--experiment=exp1', '--dry-run', '--',
                     '--mode=train_then_eval', "--note=it's a test")
  assert proc.returncode == 0, proc.stderr
  scp, setup, train = _gcloud_commands(proc.stdout)
  assert scp[4] == 'scp' and scp[6] == f'{NAME}:supcon_tf.tgz'
  assert 'pip install' in _option(setup, 'command')
  assert not any(a.startswith('--worker') for a in scp + setup + train)
  remote = shlex.split(_option(train, 'command'))
  main = remote[remote.index('python3'):]
  assert main[:3] == ['python3', '-m', 'supcon_tf.main']
  assert '--tpu=local' in main
  assert f'--model_dir={BUCKET}/supcon_tf/exp1' in main
  # Flags after -- reach supcon_tf.main intact, after the flagfile.
  assert main.index('--mode=train_then_eval') > main.index(
      f'--flagfile={FLAGFILE}')
  assert "--note=it's a test" in main
  assert remote[-2:] == ['tee', '~/logs/exp1.log']


def test_pod_run_installs_everywhere_and_trains_on_worker_0(fake_gcloud):
  proc = fake_gcloud('run_pod.sh', *LOCATION, *EXPERIMENT,
                     '--git-url=https://example.com/supcon_tf.git',
                     '--git-ref=v1.0', '--env=A=1,B=2', '--dry-run')
  assert proc.returncode == 0, proc.stderr
  setup, train = _gcloud_commands(proc.stdout)  # No scp with --git-url.
  assert '--worker=all' in setup
  assert 'git clone --quiet https://example.com/supcon_tf.git' in _option(
      setup, 'command')
  assert 'git checkout --quiet v1.0' in _option(setup, 'command')
  assert '--worker=0' in train
  remote = shlex.split(_option(train, 'command'))
  assert remote[remote.index('env') + 1:remote.index('python3')] == [
      'TPU_LOAD_LIBRARY=0', 'A=1', 'B=2']
  for flag in (f'--tpu={NAME}', f'--tpu_zone={ZONE}',
               f'--gcp_project={PROJECT}'):
    assert flag in remote


def test_detach(fake_gcloud):
  proc = fake_gcloud('run_experiment.sh', *LOCATION, *EXPERIMENT, '--detach',
                     '--dry-run')
  assert proc.returncode == 0, proc.stderr
  command = _option(_gcloud_commands(proc.stdout)[-1], 'command')
  assert 'nohup ' in command and 'tail -f' in proc.stderr


def test_launch_picks_the_runner_by_slice_size(fake_gcloud):
  for accelerator, pod in (('v3-8', False), ('v3-128', True)):
    args = LOCATION + EXPERIMENT + [f'--accelerator-type={accelerator}']
    proc = fake_gcloud('launch.sh', *args, '--dry-run')
    assert proc.returncode == 0, proc.stderr
    gcloud = _gcloud_commands(proc.stdout)
    assert [c[4] for c in gcloud] == ['describe', 'create', 'scp', 'ssh',
                                      'ssh', 'delete']
    assert ('--worker=0' in gcloud[-2]) == pod
    assert gcloud[-1][-1] == '--quiet'


def test_launch_keep(fake_gcloud):
  proc = fake_gcloud('launch.sh', *VALID_ARGS['launch.sh'], '--keep',
                     '--dry-run')
  assert proc.returncode == 0, proc.stderr
  assert 'delete' not in [c[4] for c in _gcloud_commands(proc.stdout)]


@pytest.mark.parametrize('script', ['create_tpu_vm.sh', 'delete_tpu_vm.sh'])
def test_real_mode_runs_exactly_the_printed_command(fake_gcloud, script):
  proc = fake_gcloud(script, *VALID_ARGS[script])
  assert proc.returncode == 0, proc.stderr
  [printed] = _commands(proc.stdout)
  assert [['gcloud', *call] for call in fake_gcloud.calls()] == [printed]


def test_launch_deletes_the_tpu_when_training_fails(fake_gcloud, tmp_path):
  proc = fake_gcloud('launch.sh', *LOCATION, *EXPERIMENT,
                     '--accelerator-type=v3-8', FAKE_GCLOUD_NO_TPU=1,
                     FAKE_GCLOUD_FAIL_ON='supcon_tf.main', FAKE_GCLOUD_FAIL_RC=7)
  calls = fake_gcloud.calls()
  assert [c[3] for c in calls] == ['describe', 'create', 'scp', 'ssh', 'ssh',
                                   'delete'], proc.stderr
  assert proc.returncode == 7  # The training failure, not the cleanup's 0.
  assert [['gcloud', *c] for c in calls] == _gcloud_commands(proc.stdout)
  # The local tarball of the code is removed.
  assert not list(tmp_path.glob('supcon_tf-*.tgz'))


def test_launch_deletes_the_tpu_when_create_fails(fake_gcloud):
  proc = fake_gcloud('launch.sh', *VALID_ARGS['launch.sh'],
                     FAKE_GCLOUD_NO_TPU=1, FAKE_GCLOUD_FAIL_ON=' create ',
                     FAKE_GCLOUD_FAIL_RC=3)
  assert proc.returncode == 3
  assert [c[3] for c in fake_gcloud.calls()] == ['describe', 'create',
                                                 'delete']


def test_launch_refuses_an_existing_tpu(fake_gcloud):
  proc = fake_gcloud('launch.sh', *VALID_ARGS['launch.sh'])  # describe: 0.
  assert proc.returncode == 2
  assert 'already exists' in proc.stderr
  assert [c[3] for c in fake_gcloud.calls()] == ['describe']


REQUIRED = [(script, option)
            for script, args in sorted(VALID_ARGS.items())
            for option in (a.split('=', 1)[0][2:] for a in args)]


@pytest.mark.parametrize('script, option', REQUIRED)
def test_missing_required_option_is_a_clear_error(fake_gcloud, script, option):
  args = [a for a in VALID_ARGS[script] if not a.startswith(f'--{option}=')]
  proc = fake_gcloud(script, *args, '--dry-run')
  assert proc.returncode == 2
  assert f'--{option} is required' in proc.stderr
  assert '--help' in proc.stderr
  assert proc.stdout == '' and fake_gcloud.calls() == []


@pytest.mark.parametrize('script, bad, message', [
    ('create_tpu_vm.sh', '--zone=Europe West', "--zone='Europe West'"),
    ('create_tpu_vm.sh', '--name=My_TPU', "--name='My_TPU'"),
    ('create_tpu_vm.sh', '--project=x', "--project='x'"),
    ('create_tpu_vm.sh', '--accelerator-type=tpu8', '--accelerator-type'),
    ('create_tpu_vm.sh', '--accelerator-type=v5litepod-8', '--version'),
    ('run_experiment.sh', '--bucket=gs://Bad Bucket', '--bucket'),
    ('run_experiment.sh', '--flagfile=flags/nope.cfg', "--flagfile='flags/nope.cfg' not found"),
    ('run_experiment.sh', '--flagfile=/etc/hostname', '--flagfile'),
    ('run_experiment.sh', '--model-dir=/tmp/x', '--model-dir'),
    ('run_experiment.sh', '--env=A B', '--env'),
    ('run_experiment.sh', '--git-ref=main', '--git-ref needs --git-url'),
    ('run_pod.sh', '--bogus=1', 'unknown option --bogus'),
    ('delete_tpu_vm.sh', 'stray', "unexpected argument 'stray'"),
])
def test_invalid_values_are_clear_errors(fake_gcloud, script, bad, message):
  key = bad.split('=', 1)[0]
  args = [a for a in VALID_ARGS[script] if a.split('=', 1)[0] != key] + [bad]
  proc = fake_gcloud(script, *args, '--dry-run')
  assert proc.returncode == 2, proc.stdout
  assert message in proc.stderr
  assert fake_gcloud.calls() == []


@pytest.mark.parametrize('script', sorted(VALID_ARGS))
def test_help(fake_gcloud, script):
  proc = fake_gcloud(script, '--help')
  assert proc.returncode == 0
  assert proc.stdout.startswith(f'Usage: bash tpu/{script}')
  assert '--dry-run' in proc.stdout
  assert fake_gcloud.calls() == []


def test_missing_gcloud_is_a_clear_error(tmp_path):
  # A PATH with only the tools the script needs besides gcloud (dry runs do
  # not need gcloud at all).
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  for tool in ('bash', 'dirname', 'basename'):
    found = subprocess.run(['bash', '-c', f'command -v {tool}'],
                           capture_output=True, text=True).stdout.strip()
    os.symlink(found, bin_dir / tool)
  env = dict(os.environ, PATH=str(bin_dir))
  proc = subprocess.run([str(bin_dir / 'bash'), 'tpu/delete_tpu_vm.sh',
                         *LOCATION], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=60)
  assert proc.returncode == 2, proc.stderr
  assert 'gcloud not found' in proc.stderr
  proc = subprocess.run([str(bin_dir / 'bash'), 'tpu/delete_tpu_vm.sh',
                         *LOCATION, '--dry-run'], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0, proc.stderr
