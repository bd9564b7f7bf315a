"""What turns the library into the notebooks' evidence: the shared per-scale models (:mod:`~.zoo`), the training
studies (:mod:`~.studies`), the evaluation of generators (:mod:`~.evaluation`), the assets the diagnosis notebooks
load (:mod:`~.assets`), the verdict rules (:mod:`~.verdicts`), every notebook's setup (:mod:`~.notebook`), the
runner that executes them (:mod:`~.reproduce`) and the speed benchmark (:mod:`~.bench`)."""
