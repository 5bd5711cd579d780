"""The pieces of the ``ufm`` command (`ufm.cli` is its entry point), one concept per module.

* `args`: the argument types and the option tables of the problem and the solver;
* `config`: built-in defaults <- ``--config`` file <- options (`resolve_config`);
* `analysis`: prediction, check, per-layer metrics and the notes of what was not computed; the memory refusal;
* `figures`: the five figures of a results folder;
* `folders`: results folders on the command line (create, clear, save inputs, load);
* `solve`: ``ufm solve`` (`run_solver`, the progress line, `cmd_solve`);
* `saved`: ``ufm check`` and ``ufm plot`` on a saved folder;
* `explore`: ``ufm explore``.

``ufm sweep`` lives in `ufm._sweep.cli`.
"""
