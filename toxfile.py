"""tox's plugin for this repository. It does two things at the start of every tox run.

1. tox finds the Pythons that pyenv installed, also when they are not on PATH.

tox looks interpreters up on PATH, where pyenv puts only its shims, which fail for a version that is not
selected with `pyenv global`/`pyenv local`. This hands every ``$PYENV_ROOT/versions/3.N.*/bin/python``
with N >= 10 (the Pythons noxton supports; probing much older ones makes the discovery fail) to
virtualenv as an interpreter to try first, as tox's ``--discover`` option does, so that ``tox`` alone
runs every environment. An explicit ``--discover`` wins.

2. XLA's compilation cache, ``{work_dir}/jax_cache`` (tox.ini's ``JAX_COMPILATION_CACHE_DIR``), is emptied.
The envs of one run share it: an entry's key holds the jaxlib version, the program and the compile options,
so envs with the same JAX (py312-jaxlatest and py313-jaxlatest; py311-jax010 and docs) compile each
program once, and no entry outlives the run that wrote it.
"""

from __future__ import annotations

import glob
import os
import re
import shutil

from tox.plugin import impl


@impl
def tox_add_core_config(core_conf, state) -> None:
    shutil.rmtree(os.path.join(core_conf["work_dir"], "jax_cache"), ignore_errors=True)
    _discover_pyenv(state.conf.options)


def _discover_pyenv(options) -> None:
    if getattr(options, "discover", None):
        return
    root = os.environ.get("PYENV_ROOT") or os.path.expanduser("~/.pyenv")
    found = []
    for exe in sorted(glob.glob(os.path.join(root, "versions", "*", "bin", "python"))):
        version = re.fullmatch(r"3\.(\d+)\.\d+", os.path.basename(os.path.dirname(os.path.dirname(exe))))
        if version and int(version.group(1)) >= 10:
            found.append(exe)
    options.discover = found
