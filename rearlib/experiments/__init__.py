"""What turns the library into the notebooks' evidence.

* :mod:`~.zoo`: the shared per-scale models (tokens, AR / reAR generators; the shipped small checkpoints).
* The training studies of notebooks 10-13 (``python -m rearlib studies``): :mod:`~.studies` (re-exports and CLI),
  :mod:`~.studies_plan` (the paper's tables, run specifications), :mod:`~.studies_workspace` (training and
  evaluation with resumable records), :mod:`~.studies_runner` (the queue under a time limit), :mod:`~.studies_results`
  (tables), :mod:`~.studies_figures`, :mod:`~.studies_transfer` (records between machines).
* :mod:`~.evaluation`: cached scores of sample sets; :mod:`~.assets`: what the diagnosis notebooks load per scale.
* :mod:`~.verdicts`: the tested verdict rules; :mod:`~.notebook`: what every notebook does first;
  :mod:`~.reproduce`: the runner; :mod:`~.bench`: training and sampling speed.
"""
